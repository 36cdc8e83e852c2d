ALTER TABLE orders VALIDATE CONSTRAINT orders_shipping_address_fk;
