-- petrel queue schema, version 7: each recipient's destination as a column
-- the scheduler can index, so claiming due mail and backing off a whole
-- destination cost O(rows touched · log n), not a scan of the queue.
--
-- Derived from the stored route (never decided again): 'local', 'smarthost',
-- or 'mx:' and the domain. petrel's Destination::key() says the same.
ALTER TABLE recipients ADD COLUMN destination TEXT
    GENERATED ALWAYS AS (CASE route WHEN 'mx' THEN 'mx:' || domain ELSE route END) VIRTUAL;

CREATE INDEX recipients_by_destination ON recipients (status, destination, next_attempt_at);
