-- A shadow: a stored version of a model that sees a share of the model's live requests after
-- their clients were answered, so that reviewers can judge it on today's traffic before it
-- answers anyone. One live shadow a model; stopped ones stay, with why and by whom.
CREATE TABLE shadows (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    share         real        NOT NULL CHECK (share > 0 AND share <= 1),
    started_at    timestamptz NOT NULL DEFAULT now(),
    started_by    integer     REFERENCES users (id),
    stopped_at    timestamptz,
    stopped_by    integer     REFERENCES users (id),
    stop_reason   text,
    CHECK ((stopped_at IS NULL) = (stop_reason IS NULL))
);
CREATE UNIQUE INDEX shadows_one_live_per_model ON shadows (model_name) WHERE stopped_at IS NULL;

-- What a shadow predicted for a sample a client was answered for: the answered prediction's id
-- and request id (its input is that prediction's), the shadow's version and outputs. Never
-- answered to anyone. The key makes a replayed entry a no-op, as for predictions.
CREATE TABLE shadow_predictions (
    prediction_id uuid        NOT NULL,
    created_at    timestamptz NOT NULL,  -- the answered prediction's (its UUIDv7's time)
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    label         text        NOT NULL,
    label_index   smallint    NOT NULL,
    confidence    real        NOT NULL,
    scores        real[]      NOT NULL,
    request_id    text        NOT NULL,
    ingested_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (created_at, prediction_id, model_version)
);
CREATE INDEX shadow_predictions_version_time ON shadow_predictions (model_name, model_version, created_at);

-- A decision taken on a shadow's live evidence keeps its figures beside the frozen-set ones.
ALTER TABLE promotions ADD COLUMN live_evidence jsonb;
