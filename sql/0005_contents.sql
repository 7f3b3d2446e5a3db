-- petrel queue schema, version 5: message content in a table of its own.
--
-- Updating a message's bookkeeping (a delay warning sent, say) used to
-- rewrite its whole row, content included; and the content is written and
-- read in chunks (SQLite incremental BLOB I/O), so a 25 MiB message never
-- needs 25 MiB of memory. Read a message with:
--   sqlite3 queue.db "SELECT CAST(content AS TEXT) FROM message_contents WHERE message_id = '...'"
CREATE TABLE message_contents (
    message_id TEXT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    content    BLOB NOT NULL           -- the message, starting with our Received header
) STRICT;

INSERT INTO message_contents (message_id, content) SELECT id, content FROM messages;
ALTER TABLE messages DROP COLUMN content;
