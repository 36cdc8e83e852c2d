"""Safe, reversible database migrations: engine, formats, linter (pglast), backfill."""
