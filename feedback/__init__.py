"""The data loop: the prediction log (Redis stream) and its ingest worker (stream -> Postgres), the
stores (all SQL lives here), moderation rules and agreement, the dataset compiler, retraining and
promotion. Imports models/, never service/; the HTTP routes over it live in service/routes/.
"""
