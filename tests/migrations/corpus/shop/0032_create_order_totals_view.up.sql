CREATE VIEW order_totals AS
SELECT o.id, o.user_id, sum(i.quantity) AS items, o.total_cents
FROM orders o JOIN order_items i ON i.order_id = o.id
GROUP BY o.id;
