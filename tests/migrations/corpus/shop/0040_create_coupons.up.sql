CREATE TABLE coupons (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code text NOT NULL,
    percent_off integer NOT NULL CHECK (percent_off BETWEEN 1 AND 100)
);
INSERT INTO coupons (code, percent_off) VALUES ('WELCOME', 10), ('VIP', 20);
