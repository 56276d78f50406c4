-- A reviewer may take back their own latest verdict while its lease would still be live: an
-- 'undo' revision withdraws that reviewer's opinion (history stays append-only).
ALTER TABLE annotations DROP CONSTRAINT annotations_verdict_check;
ALTER TABLE annotations ADD CONSTRAINT annotations_verdict_check
    CHECK (verdict IN ('correct', 'wrong', 'discard', 'unsure', 'added', 'resolve', 'erase', 'undo'));
