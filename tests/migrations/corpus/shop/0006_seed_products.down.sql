DELETE FROM products WHERE sku LIKE 'SKU-%';
