"""The data loop, by subject, with all the product's SQL: predictions (the log, its spool, ingest,
dead letters), review (users, the queue and its claims, verdicts, browsing, moderation rules),
datasets (original data, versions, compiling, validation), the champion and its promotions, and
retraining; `errors` holds the domain exceptions every layer raises, `use_cases` what the command
line, the HTTP routes and the demos share. The loop demo counts rows of its own scratch database.
Imports models/, never service/; the faces over it live in service/.
"""
