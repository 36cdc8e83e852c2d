-- Unsafe: one transaction row-locks every matching order until commit.
UPDATE orders SET status = 'pending' WHERE status = 'new';
