-- petrel queue schema, version 7: each recipient's destination as a column
-- the scheduler can index, so claiming due mail and backing off a whole
-- destination cost O(rows touched · log n), not a scan of the queue.
--
-- Derived from the stored route (never decided again): 'local', 'smarthost',
-- or 'mx:' and the domain. petrel's Destination::key() says the same.
ALTER TABLE recipients ADD COLUMN destination TEXT
    GENERATED ALWAYS AS (CASE route WHEN 'mx' THEN 'mx:' || domain ELSE route END) VIRTUAL;

CREATE INDEX recipients_by_destination ON recipients (status, destination, next_attempt_at);

-- Per destination: one pass over the waiting recipients' index entries, no
-- join (under half a second with a million waiting; benches/scale.rs).
DROP VIEW queue_by_domain;
CREATE VIEW queue_by_domain AS
SELECT
    CASE WHEN destination LIKE 'mx:%' THEN 'mx' ELSE coalesce(destination, 'unrouted') END
                                                          AS route,
    CASE WHEN destination LIKE 'mx:%' THEN substr(destination, 4)
         ELSE coalesce(destination, 'unrouted') END       AS domain,
    count(*)                                              AS recipients,
    min(next_attempt_at)                                  AS next_attempt_at
FROM recipients
WHERE status IN ('queued', 'delivering')
GROUP BY destination
ORDER BY recipients DESC;
