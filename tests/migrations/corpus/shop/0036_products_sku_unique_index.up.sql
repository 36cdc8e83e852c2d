-- UNIQUE the safe way, step 1: build the index concurrently.
CREATE UNIQUE INDEX CONCURRENTLY products_sku_key ON products (sku);
