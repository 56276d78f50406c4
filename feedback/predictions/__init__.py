"""Predictions, from the answer to the table: the log (a Redis stream written on the request path),
its local spool for when Redis is away, the record and its encoding, the ingest worker (stream ->
Postgres, at least once, stored once), the dead letters it leaves, and the prediction SQL.
"""
