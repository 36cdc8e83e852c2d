-- changeover:phase contract
DROP TABLE coupons;
