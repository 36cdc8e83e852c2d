-- changeover:phase contract
-- Contract, once no release reads users.email any more.
DROP TRIGGER users_sync_email ON users;
DROP FUNCTION users_sync_email();
ALTER TABLE users DROP COLUMN email;
