INSERT INTO products (sku, name, price_cents)
SELECT 'SKU-' || g, 'Product ' || g, 100 * g FROM generate_series(1, 50) g;
