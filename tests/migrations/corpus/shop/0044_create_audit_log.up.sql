-- Works, but the linter warns: serial, int key, timestamp, varchar(n).
CREATE TABLE audit_log (
    id serial PRIMARY KEY,
    at timestamp NOT NULL DEFAULT now(),
    actor varchar(64),
    action text NOT NULL
);
