-- changeover:phase contract
ALTER TABLE orders DROP COLUMN coupon_id;
