-- Blind review of a shadow: the label shown to a reviewer may be the shadow's rather than the
-- answer's, and the reviewer is not told which. The lease keeps what was shown; the verdict keeps
-- it too, so that 'correct' judges the label shown and an undo shows the same one again.
ALTER TABLE leases ADD COLUMN proposed text;  -- NULL: the answer's own label
ALTER TABLE annotations ADD COLUMN proposed text;

-- How long each model took on the samples the shadow saw: the answer's call (its batch's queue
-- and inference, as the request waited for it) and the shadow's (the call that ran it).
ALTER TABLE shadow_predictions ADD COLUMN answer_ms real, ADD COLUMN shadow_ms real;

-- Every read of shadow predictions is by time since a shadow started (the key's first column) or
-- by prediction: the extra index only cost each insert its upkeep.
DROP INDEX shadow_predictions_version_time;
