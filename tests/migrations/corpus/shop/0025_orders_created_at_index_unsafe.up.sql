-- Unsafe: blocks writes on orders for the whole build.
CREATE INDEX orders_created_at ON orders (created_at);
