-- petrel queue schema, version 9: messages a content filter (milter) put
-- in quarantine. The reason is kept with the message; its recipients wait
-- with next_attempt_at '9999-12-31 23:59:59' (never due, never retried by
-- `queue retry`) until `petrel queue release ID` makes them due.
ALTER TABLE messages ADD COLUMN quarantine TEXT;

-- `petrel queue list` finds the held ones without reading every message.
CREATE INDEX messages_quarantined ON messages (id) WHERE quarantine IS NOT NULL;
