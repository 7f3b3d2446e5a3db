-- petrel queue schema, version 3: delivery bookkeeping.

-- Set when the one "still trying" notice (queue.delay_warning) went out.
ALTER TABLE messages ADD COLUMN delay_warning_sent_at TEXT;

-- Summary per destination domain, for a quick look at what is stuck where.
CREATE VIEW queue_by_domain AS
SELECT
    substr(address, instr(address, '@') + 1) AS domain,
    count(*)                                 AS recipients,
    min(next_attempt_at)                     AS next_attempt_at,
    max(attempts)                            AS max_attempts
FROM recipients
WHERE status IN ('queued', 'delivering')
GROUP BY domain
ORDER BY recipients DESC;
