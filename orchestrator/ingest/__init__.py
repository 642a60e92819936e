"""Ingestion: sources (COCO, JSONL) → probe → upload → one Delta commit."""
