ALTER TABLE payments ADD COLUMN refunded_at timestamptz;
