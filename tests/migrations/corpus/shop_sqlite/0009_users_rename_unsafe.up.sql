-- Unsafe: old code breaks at commit.
ALTER TABLE users RENAME COLUMN display_name TO nickname;
