-- Large inputs (images) in an object store (`feedback.predictions.blobs`): the row keeps the
-- object's key, the input's size and SHA-256 (its media type is `input_type`), and `input` is NULL.
-- An erased input has neither bytes nor key.
ALTER TABLE predictions ADD COLUMN input_key text, ADD COLUMN input_size integer, ADD COLUMN input_sha256 text;
-- Whether another row still names an object, before erasure or retention deletes it.
CREATE INDEX predictions_input_key ON predictions (input_key) WHERE input_key IS NOT NULL;
