-- changeover:phase contract
-- The shop went single-currency; the new release no longer reads it.
ALTER TABLE orders DROP COLUMN currency;
