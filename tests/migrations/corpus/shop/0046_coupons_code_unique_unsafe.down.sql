ALTER TABLE coupons DROP CONSTRAINT coupons_code_key;
