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
