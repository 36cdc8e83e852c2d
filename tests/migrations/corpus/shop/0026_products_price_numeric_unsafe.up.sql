-- Unsafe: bigint -> numeric rewrites the table and changes what old code reads.
ALTER TABLE products ALTER COLUMN price_cents TYPE numeric;
