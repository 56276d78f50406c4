-- Gold items (`feedback.review.gold`): items whose right label is known, mixed into claims to
-- measure each reviewer. A reviewer's answer on one is kept here, never as an annotation: it does
-- not change the item, nor reach a dataset version.
CREATE TABLE gold_items (
    prediction_id   uuid        PRIMARY KEY,
    item_created_at timestamptz NOT NULL,
    model_name      text        NOT NULL,
    label           text        NOT NULL,
    source          text        NOT NULL CHECK (source IN ('validation', 'dispute', 'admin')),
    marked_by       integer     REFERENCES users (id),
    marked_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE gold_leases (
    prediction_id uuid        NOT NULL REFERENCES gold_items (prediction_id),
    user_id       integer     NOT NULL REFERENCES users (id),
    expires_at    timestamptz NOT NULL,
    leased_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prediction_id, user_id)
);

CREATE TABLE gold_answers (
    id            bigserial   PRIMARY KEY,
    prediction_id uuid        NOT NULL REFERENCES gold_items (prediction_id),
    user_id       integer     NOT NULL REFERENCES users (id),
    verdict       text        NOT NULL CHECK (verdict IN ('correct', 'wrong', 'discard', 'unsure', 'undo')),
    label         text,       -- the label the verdict says (the shown one for 'correct'); NULL otherwise
    correct       boolean,    -- the said label is the gold one; NULL: unsure or undone
    seconds       real,
    at            timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX gold_answers_user ON gold_answers (user_id, prediction_id, id);
