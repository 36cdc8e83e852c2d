ALTER TABLE orders ADD COLUMN coupon_id bigint;
