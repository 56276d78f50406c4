-- Live model health (`feedback.health`): each model version's reference (its run over a
-- validation version), and hourly sketches of its predictions (counts that add up), folded in once
-- each by the ingest workers' health job, which keeps its place per model in `health_cursors`.
CREATE TABLE health_references (
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    validation_id text        NOT NULL,
    reference     jsonb       NOT NULL,
    computed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, model_version, validation_id)
);

CREATE TABLE health_windows (
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    window_start  timestamptz NOT NULL,
    validation_id text        NOT NULL,  -- the reference whose bins the sketch's inputs use ('' for none)
    sketch        jsonb       NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, window_start, model_version)
);

CREATE TABLE health_cursors (
    model_name      text        PRIMARY KEY,
    processed_until timestamptz NOT NULL  -- predictions created before it are in the windows
);
