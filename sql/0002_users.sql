-- petrel queue schema, version 2: accounts.
--
-- An account is both a login (SMTP AUTH) and a local mailbox, delivered to
-- data_dir/mail/<domain>/<local part>/ as a Maildir. Managed with
-- `petrel user add|passwd|del|list`.

CREATE TABLE users (
    address             TEXT PRIMARY KEY,  -- local@domain in lower case; also the login name
    password_hash       TEXT NOT NULL,     -- argon2id in PHC string format, never the password
    created_at          TEXT NOT NULL,
    password_changed_at TEXT NOT NULL
) STRICT;
