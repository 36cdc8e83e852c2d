-- Step 3: SET NOT NULL skips its scan thanks to the validated CHECK, which then goes.
ALTER TABLE users ALTER COLUMN display_name SET NOT NULL;
ALTER TABLE users DROP CONSTRAINT users_display_name_nn;
