-- petrel queue schema, version 4: each recipient's route, decided once when
-- the message was accepted, and the delivery status notification (RFC 3461)
-- requests that came with it.

-- Where the recipient's mail goes:
--   'local'     a Maildir of ours; `mailbox` is its canonical key
--   'mx'        the MX hosts of `domain`
--   'smarthost' the configured smart host
-- NULL only for recipients queued by petrel 0.1 before this migration; the
-- server gives them a route when it starts, before delivering anything.
ALTER TABLE recipients ADD COLUMN route TEXT
    CHECK (route IN ('local', 'mx', 'smarthost'));
ALTER TABLE recipients ADD COLUMN mailbox TEXT;  -- route 'local': canonical mailbox key
ALTER TABLE recipients ADD COLUMN domain TEXT;   -- the recipient's domain, lower case
-- RFC 3461 NOTIFY as accepted: 'NEVER' or a list of SUCCESS, FAILURE, DELAY;
-- NULL when the client gave none (failures and delays are reported).
ALTER TABLE recipients ADD COLUMN notify TEXT;
ALTER TABLE recipients ADD COLUMN orcpt TEXT;    -- RFC 3461 ORCPT, decoded ("rfc822;a@b")
ALTER TABLE recipients ADD COLUMN last_status TEXT; -- RFC 3463 status of last_reply, e.g. 4.4.1

ALTER TABLE messages ADD COLUMN dsn_ret TEXT CHECK (dsn_ret IN ('FULL', 'HDRS'));
ALTER TABLE messages ADD COLUMN dsn_envid TEXT;

DROP VIEW queue_by_domain;
-- Summary per destination, for a quick look at what is stuck where.
CREATE VIEW queue_by_domain AS
SELECT
    coalesce(route, 'unrouted')                            AS route,
    CASE WHEN route = 'local' THEN 'local'
         ELSE coalesce(domain, substr(address, instr(address, '@') + 1)) END AS domain,
    count(*)                                               AS recipients,
    min(next_attempt_at)                                   AS next_attempt_at,
    max(attempts)                                          AS max_attempts
FROM recipients
WHERE status IN ('queued', 'delivering')
GROUP BY 1, 2
ORDER BY recipients DESC;

DROP VIEW queue_status;
-- What is waiting, why, and when it is tried next: the operator's view.
CREATE VIEW queue_status AS
SELECT
    m.id                AS queue_id,
    m.received_at       AS received_at,
    CASE WHEN m.sender = '' THEN '<>' ELSE m.sender END AS sender,
    r.address           AS recipient,
    coalesce(r.route, 'unrouted') AS route,
    r.status            AS status,
    r.attempts          AS attempts,
    CASE
        WHEN r.status = 'delivering' THEN 'being delivered now'
        WHEN r.route IS NULL THEN 'waiting for the server to route it'
        WHEN r.attempts = 0 AND r.next_attempt_at <= datetime('now') THEN 'new, due now'
        WHEN r.next_attempt_at <= datetime('now') THEN 'due now'
        ELSE 'retry at ' || r.next_attempt_at
    END                 AS waiting,
    r.last_reply        AS last_reply,
    r.relay             AS last_relay,
    m.size              AS size,
    CAST((julianday('now') - julianday(m.received_at)) * 86400 AS INTEGER) AS age_seconds
FROM recipients r
JOIN messages m ON m.id = r.message_id
WHERE r.status IN ('queued', 'delivering')
ORDER BY r.next_attempt_at, m.id;
