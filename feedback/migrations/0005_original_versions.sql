-- A model's original training data, imported once (`loop datasets import`), is a version too: the
-- training side of its frozen split, from which every training version starts.
ALTER TABLE dataset_versions DROP CONSTRAINT dataset_versions_kind_check;
ALTER TABLE dataset_versions ADD CONSTRAINT dataset_versions_kind_check
    CHECK (kind IN ('training', 'validation', 'original'));
-- Samples reviewers add are kept for the model they were added to (formerly all under 'reviewer').
CREATE INDEX predictions_reviewer_added ON predictions (model_name) WHERE source = 'reviewer';
