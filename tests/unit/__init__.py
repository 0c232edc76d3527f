"""Unit tests: pure code, no Ray, no database, no server process (fast)."""
