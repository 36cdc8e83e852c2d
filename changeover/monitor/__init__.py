"""Per-slot metrics, observation windows, rollback triggers, Prometheus exposition, notifications."""
