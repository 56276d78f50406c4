-- Likely label errors (`feedback.suspects`): a model's latest ranking of a training version by
-- confident learning. Working state, replaced by the next ranking; the `suspect` review order leases
-- the logged predictions among them, most likely first, until one is judged after the version.
CREATE TABLE label_suspects (
    model_name      text        NOT NULL,
    item_id         text        NOT NULL,  -- the version's row id: a prediction's, or an original row's
    prediction_id   uuid,                  -- set where the row is a logged prediction (reviewable)
    item_created_at timestamptz,           -- and its time (the log's key is both)
    rank            integer     NOT NULL,  -- 1: the most likely error
    quality         real        NOT NULL,  -- the out-of-sample probability of the label given
    label           text        NOT NULL,  -- as given in the version
    suggested       text        NOT NULL,  -- the most probable class out of sample
    dataset_id      text        NOT NULL,
    watermark       bigint      NOT NULL,  -- the version's; a verdict after it judges the item again
    found_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_name, item_id)
);
CREATE INDEX label_suspects_prediction ON label_suspects (prediction_id);
CREATE INDEX label_suspects_rank ON label_suspects (rank);
