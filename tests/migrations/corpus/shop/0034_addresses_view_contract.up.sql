-- changeover:phase contract
DROP VIEW addresses;
