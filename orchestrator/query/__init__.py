"""Slice queries: parse text to an AST, type-check and compile it for the manifest scan."""
