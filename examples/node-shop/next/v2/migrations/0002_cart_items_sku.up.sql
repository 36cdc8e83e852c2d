-- Release 2, expand: add sku; release 1 (still live while this runs) never names it, so it keeps
-- working. item may now be NULL, for the rows release 3 will write with sku only.
ALTER TABLE cart_items ADD COLUMN sku text;
ALTER TABLE cart_items ALTER COLUMN item DROP NOT NULL;
-- changeover:backfill table=cart_items batch=1000
UPDATE cart_items SET sku = item WHERE sku IS NULL;
