-- Release 3, contract: release 2 reads item, so this waits until no release older than 3 runs:
-- a deploy of release 3 stops before it, `npm run db:migrate:contract` applies it afterwards.
-- changeover:phase contract
ALTER TABLE cart_items DROP COLUMN item;
