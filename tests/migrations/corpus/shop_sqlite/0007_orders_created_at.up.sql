ALTER TABLE orders ADD COLUMN created_at TEXT;
-- changeover:backfill table=orders batch=500
UPDATE orders SET created_at = '2024-01-01' WHERE created_at IS NULL;
