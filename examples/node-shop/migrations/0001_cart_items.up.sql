-- Release 1: the cart.
CREATE TABLE cart_items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_name text NOT NULL,
    item text NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX cart_items_user_name ON cart_items (user_name);
