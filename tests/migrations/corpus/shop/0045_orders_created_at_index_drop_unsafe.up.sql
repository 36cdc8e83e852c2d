-- Unsafe: DROP INDEX without CONCURRENTLY takes ACCESS EXCLUSIVE on orders.
DROP INDEX orders_created_at;
