DROP TRIGGER orders_audit;
DROP TABLE audit;
