"""A read-only web app over a store: datasets, versions, slices, items, diffs and statistics,
as the principal of the store's credentials sees them (``orchestrator browse``; see ``app``)."""
