-- Demo data so later migrations meet a non-empty shop.
INSERT INTO users (email) SELECT 'user' || g || '@example.com' FROM generate_series(1, 300) g;
INSERT INTO orders (user_id, status, total_cents)
SELECT 1 + (g % 300), CASE WHEN g % 7 = 0 THEN 'new' ELSE 'paid' END, g * 10 FROM generate_series(1, 2000) g;
INSERT INTO order_items (order_id, product_id, quantity)
SELECT g, 1 + (g % 50), 1 + (g % 3) FROM generate_series(1, 2000) g;
