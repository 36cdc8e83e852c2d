DROP INDEX CONCURRENTLY IF EXISTS orders_shipping_address_id;
