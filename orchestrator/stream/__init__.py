"""Reading a dataset version: :class:`~orchestrator.stream.dataset.Dataset` pins a version on
open; ``index`` locates a slice's items, ``order`` picks which positions a reader visits,
``reader`` fetches blobs (through the node-local ``cache``) and ``decode`` turns them into item
dicts; ``skips`` counts items left out with ``on_error="skip"``, and ``split`` holds the
train/validation membership and the training shards. ``orchestrator.adapters`` builds the
PyTorch, TensorFlow and Ray Data readers on these."""
