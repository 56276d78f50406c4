"""The data loop: the prediction log (Redis stream) and its ingest worker (stream -> Postgres), the
stores (the product's SQL lives here; the loop demo in `service/demo_loop.py` counts rows of
its own scratch database), moderation rules and agreement, the dataset compiler, retraining and
promotion. Imports models/, never service/; the HTTP routes over it live in service/routes/.
"""
