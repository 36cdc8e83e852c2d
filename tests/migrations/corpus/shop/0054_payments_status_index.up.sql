CREATE INDEX CONCURRENTLY payments_status ON payments (status) WHERE status <> 'captured';
