CREATE TABLE coupons (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code text NOT NULL CONSTRAINT coupons_code_key UNIQUE,
    percent_off integer NOT NULL CHECK (percent_off BETWEEN 1 AND 100)
);
