-- Compiled data: training versions and validation versions. The id is DVC's directory hash of the
-- version's files, so a row can never describe other bytes than those it was compiled to.
CREATE TABLE dataset_versions (
    id          text        PRIMARY KEY CHECK (id ~ '^[0-9a-f]{32}$'),
    kind        text        NOT NULL CHECK (kind IN ('training', 'validation')),
    model_name  text        NOT NULL,
    uri         text        NOT NULL,
    watermark   bigint,                   -- highest annotation revision included (training only)
    validation_id text      REFERENCES dataset_versions (id),  -- held out of this training version
    parent_id   text        REFERENCES dataset_versions (id),  -- the validation version this one fixes
    rows        bigint      NOT NULL,
    per_class   jsonb       NOT NULL,
    manifest    jsonb       NOT NULL,
    created_by  integer     REFERENCES users (id),
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'training') = (validation_id IS NOT NULL))
);
CREATE INDEX dataset_versions_model ON dataset_versions (model_name, kind, created_at);
CREATE TRIGGER dataset_versions_append_only BEFORE UPDATE OR DELETE ON dataset_versions
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- A model's figures on a validation version. A new validation version gets every model that was
-- compared on the old one evaluated again, so comparisons are always on the same version.
CREATE TABLE evaluations (
    model_name    text        NOT NULL,
    model_version text        NOT NULL,
    validation_id text        NOT NULL REFERENCES dataset_versions (id),
    accuracy      double precision NOT NULL,
    figures       jsonb       NOT NULL,   -- ECE, per-class figures, confusion matrix
    evaluated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, model_version, validation_id)
);

-- Every gate decision and forced promotion, in order. The champion is the model of the latest
-- 'baseline', 'promoted' or 'forced' row; nothing here is ever edited.
CREATE TABLE promotions (
    id                 bigserial   PRIMARY KEY,
    model_name         text        NOT NULL,
    model_version      text        NOT NULL,
    decision           text        NOT NULL CHECK (decision IN ('baseline', 'promoted', 'rejected', 'forced')),
    reason             text        NOT NULL,
    validation_id      text        REFERENCES dataset_versions (id),
    dataset_id         text        REFERENCES dataset_versions (id),
    accuracy           double precision,
    champion_version   text,
    champion_accuracy  double precision,
    margin             double precision,
    run_id             text,
    actor_id           integer     REFERENCES users (id),
    at                 timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX promotions_model ON promotions (model_name, id);
CREATE TRIGGER promotions_append_only BEFORE UPDATE OR DELETE ON promotions
    FOR EACH ROW EXECUTE FUNCTION forbid_change();
