ALTER TABLE orders DROP CONSTRAINT orders_shipping_address_fk;
