CREATE VIEW addresses AS SELECT * FROM shipping_addresses;
