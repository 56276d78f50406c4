"""In-process component benchmarks (ingest, review queries, compiling, the ceiling of ONNX Runtime)
and the runs that start servers of their own to measure them (ours against the peer servers under
`peers/`, logging on and off, the request path, images, the Open Inference Protocol, CPU shares,
profiles). Each is `python -m benchmarks.<name>`; docs/benchmarks.md has their figures. Servers,
ports, throwaway databases and key prefixes come from `harness`; the load from `loadtest`'s drivers."""
