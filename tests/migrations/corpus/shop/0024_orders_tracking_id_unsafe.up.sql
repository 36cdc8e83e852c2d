-- Unsafe: a volatile default rewrites the whole table under ACCESS EXCLUSIVE.
ALTER TABLE orders ADD COLUMN tracking_id uuid DEFAULT gen_random_uuid();
