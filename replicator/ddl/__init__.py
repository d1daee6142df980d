"""Schema changes during the migration: captured on the source (capture.py), applied in the stream (sink/ddl.py)."""
