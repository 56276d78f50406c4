-- Label Studio as a front end to the review queue. Each of its annotations is remembered with what
-- it last said, so that an update records a verdict only when the label changed, a deletion takes
-- the reviewer's opinion back, and a replayed event or a second import records nothing new.
CREATE TABLE label_studio_annotations (
    annotation_id   bigint      PRIMARY KEY,             -- Label Studio's id of the annotation
    prediction_id   uuid        NOT NULL,
    item_created_at timestamptz NOT NULL,
    actor_id        integer     NOT NULL REFERENCES users (id),
    said            text,                                -- its label, '<skipped>', or NULL once deleted
    revision        bigint,                              -- our latest annotation revision it made
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A task Label Studio sent to `/predict` is found again by the tag its prediction carries.
CREATE INDEX predictions_label_studio_task ON predictions ((tags ->> 'label_studio.task'), created_at)
    WHERE tags ? 'label_studio.task';
