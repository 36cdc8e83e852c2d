-- Renaming users.email to email_address the safe way. Expand: the new column, kept in sync
-- with the old one by a trigger, so old code (email) and new code (email_address) both work.
ALTER TABLE users ADD COLUMN email_address text;
CREATE FUNCTION users_sync_email() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.email_address := COALESCE(NEW.email_address, NEW.email);
    NEW.email := COALESCE(NEW.email, NEW.email_address);
    RETURN NEW;
END $$;
CREATE TRIGGER users_sync_email BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_email();
