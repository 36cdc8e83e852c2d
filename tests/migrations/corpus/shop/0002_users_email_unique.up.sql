-- Existing table (created by the previous migration): build the index without blocking writes.
CREATE UNIQUE INDEX CONCURRENTLY users_email_key ON users (email);
