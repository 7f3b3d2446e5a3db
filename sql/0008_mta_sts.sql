-- petrel queue schema, version 8: MTA-STS policies (RFC 8461) of the
-- domains petrel delivers to, as last fetched. A policy is used until it
-- expires, also while its HTTPS host cannot be reached: that is the point
-- of the cache, since whoever can block the fetch must not be able to
-- turn enforcement off.
CREATE TABLE mta_sts_policies (
    domain     TEXT PRIMARY KEY,    -- lower case
    policy_id  TEXT NOT NULL,       -- id= of the _mta-sts TXT record it came with
    mode       TEXT NOT NULL CHECK (mode IN ('enforce', 'testing', 'none')),
    mx         TEXT NOT NULL,       -- the mx: patterns, one per line
    max_age    INTEGER NOT NULL,    -- seconds
    fetched_at TEXT NOT NULL,       -- UTC, as every timestamp in this database
    expires_at TEXT NOT NULL
) WITHOUT ROWID;
