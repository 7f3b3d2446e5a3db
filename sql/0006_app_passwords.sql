-- petrel queue schema, version 6: app passwords and login audit.
--
-- SMTP AUTH cannot carry a second factor, so each device gets its own
-- generated, revocable password (`petrel user app-password add`), and
-- `[auth] require_app_passwords` can keep the main password out of SMTP.
CREATE TABLE app_passwords (
    address        TEXT NOT NULL,     -- users.address
    label          TEXT NOT NULL,     -- the device, as the operator named it
    selector       TEXT NOT NULL,     -- the password's first 4 letters: picks the one hash a login checks
    password_hash  TEXT NOT NULL,     -- argon2id (PHC string) of the whole password, never the password
    created_at     TEXT NOT NULL,
    last_used_at   TEXT,
    last_used_from TEXT,              -- client address of the last login with it
    PRIMARY KEY (address, label),
    UNIQUE (address, selector)
) STRICT;

-- An account's app passwords leave with it.
CREATE TRIGGER users_take_their_app_passwords AFTER DELETE ON users
BEGIN
    DELETE FROM app_passwords WHERE address = OLD.address;
END;

-- The hash replaced by the last `user passwd`, so it cannot come back.
ALTER TABLE users ADD COLUMN previous_password_hash TEXT;
-- Written by the server at each login: what `petrel user list` shows.
ALTER TABLE users ADD COLUMN last_login_at TEXT;
ALTER TABLE users ADD COLUMN last_login_from TEXT;
ALTER TABLE users ADD COLUMN last_login_label TEXT;  -- the app password used; NULL: the main password
ALTER TABLE users ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;  -- failed logins since the last success
ALTER TABLE users ADD COLUMN last_failure_at TEXT;
ALTER TABLE users ADD COLUMN last_failure_from TEXT;

-- Client addresses (IPv6: their /64) refused AUTH after too many failures,
-- kept so `petrel user list` can show them and `petrel user unlock` lift
-- them; the running server holds the same in memory.
CREATE TABLE auth_lockouts (
    client  TEXT PRIMARY KEY,
    account TEXT,                      -- the account the failures aimed at, if it exists
    until   TEXT NOT NULL
) STRICT;

-- The app password a message was sent with (NULL: the main password).
ALTER TABLE messages ADD COLUMN auth_label TEXT;
