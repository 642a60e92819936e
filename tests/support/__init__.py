"""Helpers for tests that need Ray clusters of their own (run in subprocesses)."""
