"""Developer tooling, not part of the library core.

Nothing in the store, the streaming readers or the training code imports this package; it
serves the people and scripts around them:

* :mod:`orchestrator.dev.seaweed` runs a real SeaweedFS S3 server on loopback: the test
  fixtures' ``s3://`` backend, the benchmarks' S3 store, and ``orchestrator store serve`` for a
  team that wants a local S3 endpoint.
* :mod:`orchestrator.dev.demo` draws deterministic synthetic street scenes with a COCO file:
  ``orchestrator demo-data``, the quickstart, the tests and the benchmarks.
"""
