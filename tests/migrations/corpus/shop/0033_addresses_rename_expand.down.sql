DROP VIEW addresses;
ALTER TABLE shipping_addresses RENAME TO addresses;
