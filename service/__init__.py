"""The faces and the wiring: the BentoML service, settings, and the command line."""
