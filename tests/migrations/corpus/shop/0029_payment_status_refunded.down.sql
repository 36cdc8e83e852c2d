-- PostgreSQL cannot drop an enum value: rebuild the type.
ALTER TYPE payment_status RENAME TO payment_status_old;
CREATE TYPE payment_status AS ENUM ('authorized', 'captured', 'failed');
ALTER TABLE payments ALTER COLUMN status TYPE payment_status USING status::text::payment_status;
DROP TYPE payment_status_old;
