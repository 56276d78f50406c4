"""Load against a running service, over HTTP only: locust's users (`locustfile`, `run_locust`), the
closed- and open-loop drivers (`wrk`, `openloop`, `latency`) and the fault runner (`faults`), which
drives `loop serve` and its servers from outside. Nothing here imports the service's packages: what
a request needs to look like comes from the service itself (`GET /models`, see `samples`)."""
