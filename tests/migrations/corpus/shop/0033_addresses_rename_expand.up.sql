-- Renaming a table the safe way: rename, and leave a view under the old name (simple views are
-- updatable), so old and new code both work.
-- changeover:ignore renaming-table the view below keeps the old name working
ALTER TABLE addresses RENAME TO shipping_addresses;
CREATE VIEW addresses AS SELECT * FROM shipping_addresses;
