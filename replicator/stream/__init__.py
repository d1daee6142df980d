"""Streaming: the session (session.py: the replication connection, the read loop, dispatch to the
sink, reconnects), the spool of a streamed in-progress transaction, the target watchdog,
throttling, the stop flag and the Prometheus metrics read from the running session."""
