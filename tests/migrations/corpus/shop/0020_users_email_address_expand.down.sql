DROP TRIGGER users_sync_email ON users;
DROP FUNCTION users_sync_email();
ALTER TABLE users DROP COLUMN email_address;
