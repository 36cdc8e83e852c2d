UPDATE products SET description = NULL;
