-- Every prediction a client was answered with, with its input.
-- The key is (created_at, id): created_at is the UUIDv7's own timestamp, so the pair is as unique
-- as the id alone, and the table can become PARTITION BY RANGE (created_at), one partition a
-- day, without changing the key or the ingest statement.
CREATE TABLE predictions (
    id            uuid        NOT NULL,
    created_at    timestamptz NOT NULL,
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    label         text        NOT NULL,
    label_index   smallint    NOT NULL,
    confidence    real        NOT NULL,
    scores        real[]      NOT NULL,
    input         bytea,                       -- .npy bytes; NULL once erased on request
    request_id    text        NOT NULL,
    tags          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (created_at, id)
);

-- Moderation queries filter by model version, label and confidence within a time range.
CREATE INDEX predictions_model_time ON predictions (model_name, model_version, created_at);
CREATE INDEX predictions_label_time ON predictions (label, created_at);
CREATE INDEX predictions_confidence ON predictions (confidence, created_at);
