-- A validation set from today's domain: a uniform random share of predictions drawn by the health
-- job (`feedback.datasets.live`), kept out of every training version, routed to review, and frozen
-- once judged as a live validation version beside the original one. Promotions record the
-- candidate's and the champion's accuracy on it beside the gate's.
ALTER TABLE dataset_versions DROP CONSTRAINT dataset_versions_kind_check;
ALTER TABLE dataset_versions ADD CONSTRAINT dataset_versions_kind_check
    CHECK (kind IN ('training', 'validation', 'original', 'live_validation'));

CREATE TABLE live_validation_items (
    prediction_id uuid        PRIMARY KEY,
    created_at    timestamptz NOT NULL,
    model_name    text        NOT NULL,
    drawn_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX live_validation_items_model ON live_validation_items (model_name, created_at);

ALTER TABLE promotions ADD COLUMN live_validation jsonb;
