"""Training: run config, lineage, fixed-shape batches, models and metrics for the orchestrator runner."""
