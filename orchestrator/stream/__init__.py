"""Reading a dataset version, below the ``Dataset`` facade: ``plan`` (the picklable read plan and
its options), ``item`` (the one item schema and its Ray encoding), ``batch`` (the one batch
layout: flat values plus offsets), ``index`` (where a slice's
items are), ``order`` (which positions a reader visits), ``reader`` (the one fetch-verify-decode
step, the one error policy, the SDK reader), ``cache`` (the node-local blob cache), ``decode``
(bytes to pixels), ``skips`` (items left out with ``on_error="skip"``) and ``split``
(train/validation membership and training shards). ``orchestrator.adapters`` builds the
PyTorch, TensorFlow and Ray Data readers on these."""
