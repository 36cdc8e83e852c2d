-- changeover:backfill table=users batch=100
UPDATE users SET email_address = email WHERE email_address IS NULL;
