CREATE INDEX CONCURRENTLY payments_order_id ON payments (order_id);
