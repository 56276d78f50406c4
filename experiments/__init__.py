"""Measured scenarios of the whole loop, run against a real `loop serve` over HTTP: the loop demo
(`loop demo-loop`, `experiments.demo_loop`) and one round of the built-in image model
(`python -m experiments.shapes_loop`). Servers, ports, throwaway databases and key prefixes come
from `harness`."""
