-- A constant default is instant on PostgreSQL 11+ (no rewrite).
ALTER TABLE orders ADD COLUMN currency text NOT NULL DEFAULT 'EUR';
