-- Step 2: validate while reads and writes go on (SHARE UPDATE EXCLUSIVE).
ALTER TABLE users VALIDATE CONSTRAINT users_display_name_nn;
