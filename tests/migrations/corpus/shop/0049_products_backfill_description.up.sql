-- changeover:backfill table=products batch=20
UPDATE products SET description = 'About ' || title WHERE description IS NULL;
