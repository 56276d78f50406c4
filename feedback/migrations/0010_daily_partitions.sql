-- The prediction log partitioned by day (UTC) of `created_at`, so that retention drops whole
-- partitions (`feedback.predictions.partitions`): one partition a day, created ahead by the ingest
-- worker and `loop maintain`, and on demand for a day that has none.
--
-- An existing table is not copied: it becomes the first partition, `predictions_legacy`, covering
-- everything before the next day starts (attaching it scans it once to check that bound; its
-- indexes become the partitioned indexes' own). It goes as a whole once that day is past retention.
-- A database without predictions starts with daily partitions only.
--
-- Annotations are history and outlive the items retention removes: their reference to
-- predictions goes (a verdict of a removed item still names it).
ALTER TABLE annotations DROP CONSTRAINT IF EXISTS annotations_item_created_at_prediction_id_fkey;

ALTER TABLE predictions RENAME TO predictions_legacy;
ALTER TABLE predictions_legacy RENAME CONSTRAINT predictions_pkey TO predictions_legacy_pkey;
ALTER INDEX predictions_model_time RENAME TO predictions_legacy_model_time;
ALTER INDEX predictions_label_time RENAME TO predictions_legacy_label_time;
ALTER INDEX predictions_confidence RENAME TO predictions_legacy_confidence;
ALTER INDEX predictions_reviewer_added RENAME TO predictions_legacy_reviewer_added;
ALTER INDEX predictions_label_studio_task RENAME TO predictions_legacy_label_studio_task;

CREATE TABLE predictions (LIKE predictions_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    PARTITION BY RANGE (created_at);
ALTER TABLE predictions ADD PRIMARY KEY (created_at, id);
CREATE INDEX predictions_model_time ON predictions (model_name, model_version, created_at);
CREATE INDEX predictions_label_time ON predictions (label, created_at);
CREATE INDEX predictions_confidence ON predictions (confidence, created_at, id);
CREATE INDEX predictions_reviewer_added ON predictions (model_name) WHERE source = 'reviewer';
CREATE INDEX predictions_label_studio_task ON predictions ((tags ->> 'label_studio.task'), created_at)
    WHERE tags ? 'label_studio.task';

DO $$
DECLARE
    newest timestamptz;
BEGIN
    SELECT max(created_at) INTO newest FROM predictions_legacy;
    IF newest IS NULL THEN
        DROP TABLE predictions_legacy;
    ELSE
        EXECUTE format(
            'ALTER TABLE predictions ATTACH PARTITION predictions_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
            date_trunc('day', greatest(newest, now()), 'UTC') + interval '1 day'
        );
    END IF;
END $$;
