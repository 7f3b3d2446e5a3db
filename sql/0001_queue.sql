-- petrel queue schema, version 1: messages and per-recipient delivery state.
--
-- Read it with:  sqlite3 petrel-data/queue.db 'SELECT * FROM queue_status'
-- All timestamps are UTC text 'YYYY-MM-DD HH:MM:SS', so they sort as text
-- and SQLite's datetime('now') compares with them directly.

-- One row per accepted message. A message leaves the queue when every one of
-- its recipients is either delivered or bounced.
CREATE TABLE messages (
    id          TEXT PRIMARY KEY,          -- queue id, as in logs and the Received header
    received_at TEXT NOT NULL,             -- when the final 250 was earned
    sender      TEXT NOT NULL,             -- envelope MAIL FROM; '' is the null sender <>
    kind        TEXT NOT NULL DEFAULT 'normal'
                CHECK (kind IN ('normal', 'bounce', 'delay_warning')),
    listener    TEXT NOT NULL,             -- smtp, submission, smtps or local (sendmail)
    client_ip   TEXT,                      -- NULL for local submission
    helo        TEXT,                      -- what the client said in EHLO/HELO
    auth_user   TEXT,                      -- account that authenticated, if any
    eight_bit   INTEGER NOT NULL DEFAULT 0, -- BODY=8BITMIME was given
    smtputf8    INTEGER NOT NULL DEFAULT 0, -- SMTPUTF8 was given
    size        INTEGER NOT NULL,          -- octets of content
    content     BLOB NOT NULL              -- the message, starting with our Received header
) STRICT;

-- One row per final recipient (after alias expansion), each with its own
-- delivery state, so one slow domain never holds up the others.
CREATE TABLE recipients (
    id               INTEGER PRIMARY KEY,
    message_id       TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address          TEXT NOT NULL,        -- where it goes
    original_address TEXT,                 -- the RCPT TO address, when an alias expanded it
    status           TEXT NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'delivering', 'sent', 'bounced')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL,        -- when the scheduler picks it up (status 'queued')
    last_attempt_at  TEXT,
    last_reply       TEXT,                 -- the remote server's reply, or why we could not ask
    relay            TEXT,                 -- host[ip]:port of the last attempt
    updated_at       TEXT NOT NULL
) STRICT;

CREATE INDEX recipients_due ON recipients (status, next_attempt_at);
CREATE INDEX recipients_by_message ON recipients (message_id);

-- What is waiting, why, and when it is tried next: the operator's view.
CREATE VIEW queue_status AS
SELECT
    m.id                AS queue_id,
    m.received_at       AS received_at,
    CASE WHEN m.sender = '' THEN '<>' ELSE m.sender END AS sender,
    r.address           AS recipient,
    r.status            AS status,
    r.attempts          AS attempts,
    CASE
        WHEN r.status = 'delivering' THEN 'being delivered now'
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
