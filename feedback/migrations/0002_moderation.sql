-- Reviewers and admins. Tokens are random (256 bits), so a SHA-256 of the token is enough to
-- store: nothing can be guessed from it, and lookups stay one index probe.
CREATE TABLE users (
    id          serial      PRIMARY KEY,
    name        text        NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    role        text        NOT NULL CHECK (role IN ('reviewer', 'admin')),
    token_hash  bytea       NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Where a row of predictions came from: the model, or a reviewer adding a sample it missed.
ALTER TABLE predictions ADD COLUMN source text NOT NULL DEFAULT 'model'
    CHECK (source IN ('model', 'reviewer'));

-- Claims and lists by confidence walk this index in exactly their order (ties by time, then id).
DROP INDEX predictions_confidence;
CREATE INDEX predictions_confidence ON predictions (confidence, created_at, id);

-- Append-only annotation history. `id` is the global revision (the dataset watermark).
CREATE TABLE annotations (
    id              bigserial   PRIMARY KEY,
    prediction_id   uuid        NOT NULL,
    item_created_at timestamptz NOT NULL,
    actor_id        integer     NOT NULL REFERENCES users (id),
    verdict         text        NOT NULL
        CHECK (verdict IN ('correct', 'wrong', 'discard', 'unsure', 'added', 'resolve', 'erase')),
    label           text,
    reason          text,
    at              timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (item_created_at, prediction_id) REFERENCES predictions (created_at, id)
);
CREATE INDEX annotations_item ON annotations (prediction_id, id);
CREATE INDEX annotations_actor ON annotations (actor_id, prediction_id);

CREATE FUNCTION forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: add a revision instead', TG_TABLE_NAME;
END $$;
CREATE TRIGGER annotations_append_only BEFORE UPDATE OR DELETE ON annotations
    FOR EACH ROW EXECUTE FUNCTION forbid_change();

-- The current state of each reviewed item, derived from its annotations in the same transaction
-- as every new revision (a projection, never edited by hand).
CREATE TABLE review_state (
    prediction_id    uuid        PRIMARY KEY,
    item_created_at  timestamptz NOT NULL,
    required_reviews smallint    NOT NULL DEFAULT 1,
    status           text        NOT NULL DEFAULT 'unreviewed'
        CHECK (status IN ('unreviewed', 'reviewed', 'discarded', 'disputed')),
    label            text,          -- the current label; NULL unless reviewed
    revision         bigint,        -- the latest annotation taken into account
    reviewers        smallint    NOT NULL DEFAULT 0
);
CREATE INDEX review_state_status ON review_state (status, item_created_at);

-- Who holds which item until when. Leases are working state, not history.
CREATE TABLE leases (
    prediction_id uuid        NOT NULL,
    user_id       integer     NOT NULL REFERENCES users (id),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (prediction_id, user_id)
);
CREATE INDEX leases_expiry ON leases (expires_at);

-- Every write, by whom and when.
CREATE TABLE audit_log (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor_id integer     REFERENCES users (id),
    action   text        NOT NULL,
    target   text,
    details  jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);

-- The current label of every item that has one: what a training set is compiled from.
CREATE VIEW current_labels AS
    SELECT s.prediction_id, s.item_created_at, s.label, s.revision
    FROM review_state s
    WHERE s.status = 'reviewed';
