ALTER TABLE cart_items ADD COLUMN item text;
-- changeover:backfill table=cart_items batch=1000
UPDATE cart_items SET item = sku WHERE item IS NULL;
