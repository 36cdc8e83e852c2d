CREATE INDEX orders_created_at ON orders (created_at);
