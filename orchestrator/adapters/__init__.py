"""Thin framework adapters: they reshape item dicts; frameworks are imported lazily here only."""
