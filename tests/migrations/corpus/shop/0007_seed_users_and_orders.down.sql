DELETE FROM order_items;
DELETE FROM orders;
DELETE FROM users;
