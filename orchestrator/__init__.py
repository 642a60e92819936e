"""orchestrator: versioned annotated training data on object storage, streamed into training.

    import orchestrator
    store = orchestrator.connect("file:///data/store")   # or "s3://bucket/prefix"
    report = store.ingest("street", coco="annotations.json", images="images/")
    ds = store.dataset("street"); ds.versions(); ds.label_counts()

``ds.plan`` is the slice's ``ReadPlan`` (picklable: what the framework adapters and Ray tasks
receive) and ``store.handle`` the store's low-level ``StoreHandle``.
"""

from orchestrator import errors
from orchestrator.dataset import Dataset
from orchestrator.handle import StoreHandle
from orchestrator.ingest.report import IngestReport
from orchestrator.manifest import LabelMap, VersionInfo
from orchestrator.store import Store, connect
from orchestrator.stream.plan import ReadPlan, StreamOptions

__all__ = ["Dataset", "IngestReport", "LabelMap", "ReadPlan", "Store", "StoreHandle", "StreamOptions",
           "VersionInfo", "connect", "errors"]
