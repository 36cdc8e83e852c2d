"""Several hosts deployed as one, coordinated through etcd (see docs/fleet.md)."""
