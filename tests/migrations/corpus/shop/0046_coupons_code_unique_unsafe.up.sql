-- Unsafe: the UNIQUE index is built under ACCESS EXCLUSIVE.
ALTER TABLE coupons ADD CONSTRAINT coupons_code_key UNIQUE (code);
