UPDATE orders SET status = 'new' WHERE status = 'pending';
