-- The unsafe way to rename: the running release breaks the moment this commits.
ALTER TABLE products RENAME COLUMN name TO title;
