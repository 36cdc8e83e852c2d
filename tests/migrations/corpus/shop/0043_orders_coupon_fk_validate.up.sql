ALTER TABLE orders VALIDATE CONSTRAINT orders_coupon_fk;
