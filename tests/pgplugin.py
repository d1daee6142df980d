"""pytest plugin: real PostgreSQL servers (placeholder; filled in below)."""
