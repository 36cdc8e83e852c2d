-- changeover:phase contract
ALTER TABLE orders DROP COLUMN total_cents;
