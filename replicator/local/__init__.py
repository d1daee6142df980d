"""Local PostgreSQL servers for the demo, tests and benchmarks (servers.py), and the demo."""
