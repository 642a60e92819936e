"""The filesystem Ray Train writes checkpoints through: the store's own, minus bucket probes.

Ray Train creates its run directory with ``create_dir``, which on S3 first asks whether the
bucket exists (HeadBucket). A principal whose keys may only write under ``runs/<principal>/``
has no bucket-level permission, so the probe fails although every write it needs is allowed.
S3 has no directories to create: this wrapper makes ``create_dir`` a no-op there and delegates
everything else to the store's filesystem (same credentials, carried by the pickled object,
never by environment variables or files).
"""

from __future__ import annotations

import pyarrow.fs as pafs


class NoDirectoryHandler(pafs.FileSystemHandler):
    """Delegates to ``inner``; ``create_dir`` does nothing (object stores have no directories)."""

    def __init__(self, inner: pafs.FileSystem) -> None:
        self.inner = inner

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoDirectoryHandler) and self.inner.equals(other.inner)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return f"orchestrator+{self.inner.type_name}"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        return None

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the root of a store")

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.inner.open_append_stream(path, metadata=metadata)


def checkpoint_filesystem(fs: pafs.FileSystem) -> pafs.FileSystem:
    """The filesystem to hand Ray Train: ``fs`` itself locally, the wrapper on S3."""
    if fs.type_name == "s3":
        return pafs.PyFileSystem(NoDirectoryHandler(fs))
    return fs
