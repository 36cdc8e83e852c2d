CREATE INDEX CONCURRENTLY orders_shipping_address_id ON orders (shipping_address_id);
