"""orchestrator: versioned annotated training data on object storage, streamed into training.

    import orchestrator
    store = orchestrator.connect("file:///data/store")   # or "s3://bucket/prefix"
    report = store.ingest("street", coco="annotations.json", images="images/")
    ds = store.dataset("street"); ds.versions(); ds.label_counts()
"""

from orchestrator import errors
from orchestrator.dataset import Dataset
from orchestrator.ingest.report import IngestReport
from orchestrator.manifest import LabelMap, VersionInfo
from orchestrator.store import Store, connect

__all__ = ["Dataset", "IngestReport", "LabelMap", "Store", "VersionInfo", "connect", "errors"]
