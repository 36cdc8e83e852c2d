-- NOT NULL the safe way, step 1: a CHECK that is not validated yet (brief lock, no scan).
ALTER TABLE users ADD CONSTRAINT users_display_name_nn CHECK (display_name IS NOT NULL) NOT VALID;
