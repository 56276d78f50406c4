-- Per-reviewer quality (`feedback.review.quality`): when each lease began, how long each verdict
-- took from its lease, and the targets an admin sets for the figures.
ALTER TABLE leases ADD COLUMN leased_at timestamptz NOT NULL DEFAULT now();
ALTER TABLE annotations ADD COLUMN seconds real;  -- from the lease to the verdict (verdicts through the queue)

CREATE TABLE reviewer_targets (
    one     boolean     PRIMARY KEY DEFAULT true CHECK (one),
    targets jsonb       NOT NULL,
    set_by  integer     REFERENCES users (id),
    set_at  timestamptz NOT NULL DEFAULT now()
);
