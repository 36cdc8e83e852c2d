ALTER TABLE products ALTER COLUMN price_cents TYPE bigint USING price_cents::bigint;
