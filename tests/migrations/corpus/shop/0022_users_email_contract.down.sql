ALTER TABLE users ADD COLUMN email text;
UPDATE users SET email = email_address;
CREATE FUNCTION users_sync_email() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.email_address := COALESCE(NEW.email_address, NEW.email);
    NEW.email := COALESCE(NEW.email, NEW.email_address);
    RETURN NEW;
END $$;
CREATE TRIGGER users_sync_email BEFORE INSERT OR UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION users_sync_email();
