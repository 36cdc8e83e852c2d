WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 500)
INSERT INTO users (email) SELECT 'user' || i || '@example.com' FROM s;
WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 3000)
INSERT INTO orders (user_id, total_cents) SELECT 1 + i % 500, i * 10 FROM s;
