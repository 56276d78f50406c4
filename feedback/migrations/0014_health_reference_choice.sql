-- The reference a model's health windows are compared with, when a team picked a window of its own
-- predictions (`loop health --set-reference SINCE/UNTIL`); no row: the current validation version.
CREATE TABLE health_reference_choice (
    model_name   text        PRIMARY KEY,
    reference_id text        NOT NULL,  -- 'window:<since>/<until>', a validation_id of health_references
    chosen_at    timestamptz NOT NULL DEFAULT now()
);
