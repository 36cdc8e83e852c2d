CREATE TABLE audit (id INTEGER PRIMARY KEY, what TEXT NOT NULL);
CREATE TRIGGER orders_audit AFTER INSERT ON orders BEGIN
    INSERT INTO audit (what) VALUES ('order ' || NEW.id);
END;
