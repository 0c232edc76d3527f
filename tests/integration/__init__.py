"""Integration tests: real Ray, real PostgreSQL and SQLite, real gRPC over loopback, real processes."""
