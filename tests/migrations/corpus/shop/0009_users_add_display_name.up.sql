-- Expand: nullable, no default: instant, old code unaffected.
ALTER TABLE users ADD COLUMN display_name text;
