"""Pure machine learning: networks, training, evaluation, ONNX export and runtime, model store.

Knows nothing of HTTP, Redis or Postgres.
"""
