"""changeover: zero-downtime blue-green deploys for any HTTP app."""

__version__ = "0.1.0"
