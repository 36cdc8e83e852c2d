ALTER TABLE payments DROP COLUMN refunded_at;
