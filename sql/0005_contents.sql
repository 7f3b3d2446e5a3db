-- petrel queue schema, version 5: message content in a table of its own.
--
-- Updating a message's bookkeeping (a delay warning sent, say) used to
-- rewrite its whole row, content included; and the content is written and
-- read in chunks (SQLite incremental BLOB I/O), so a 25 MiB message never
-- needs 25 MiB of memory. Read a message with:
--   sqlite3 queue.db "SELECT CAST(c.content AS TEXT) FROM messages m
--                     JOIN message_contents c ON c.id = m.content_id WHERE m.id = '...'"
CREATE TABLE message_contents (
    id      INTEGER PRIMARY KEY,       -- messages.content_id
    content BLOB NOT NULL              -- the message, starting with our Received header
) STRICT;

ALTER TABLE messages ADD COLUMN content_id INTEGER;
INSERT INTO message_contents (id, content) SELECT rowid, content FROM messages;
UPDATE messages SET content_id = rowid;
ALTER TABLE messages DROP COLUMN content;

-- A message's content leaves with it, however it is deleted.
CREATE TRIGGER messages_take_their_content AFTER DELETE ON messages
BEGIN
    DELETE FROM message_contents WHERE id = OLD.content_id;
END;
