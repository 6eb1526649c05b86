"""Ray's storage location (a local folder, an NFS mount, or a cloud URI such as s3://bucket/prefix)
read through pyarrow's filesystems, as Ray itself reads and writes it.

Paths inside are pyarrow filesystem paths: absolute paths locally, `bucket/key` on S3 (what
Ray reports as a checkpoint's path). `uri()` turns one back into what a user can paste.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Storage:
    def __init__(self, location: str):
        if is_uri(location):
            self.fs, self.root = pafs.FileSystem.from_uri(location)
            self.scheme: str | None = location.split("://", 1)[0]
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).resolve())
            self.scheme = None
        self.root = self.root.rstrip("/")

    def probe(self) -> None:
        """Create the root and write and remove a small file in it: raises OSError when the
        location cannot be reached or written."""
        self.fs.create_dir(self.root)
        probe = self.join(f".write-probe-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(probe) as f:
            f.write(b"deeplab")
        self.fs.delete_file(probe)

    @property
    def local(self) -> bool:
        return self.scheme is None

    def join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def uri(self, path: str) -> str:
        return f"{self.scheme}://{path}" if self.scheme else path

    def _type(self, path: str):
        return self.fs.get_file_info(path).type

    def is_dir(self, path: str) -> bool:
        return self._type(path) == pafs.FileType.Directory

    def is_file(self, path: str) -> bool:
        return self._type(path) == pafs.FileType.File

    def size(self, path: str) -> int | None:
        """A file's size in bytes; None when it is not a file."""
        info = self.fs.get_file_info(path)
        return info.size if info.type == pafs.FileType.File else None

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as f:
            return f.read().decode(errors="replace")

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def put(self, local: Path, path: str) -> None:
        """A local file into storage at `path`: renamed when the storage is local and on the
        same filesystem (nothing is copied), else copied."""
        if self.local:
            try:
                os.replace(local, path)
                return
            except OSError as e:
                if e.errno != errno.EXDEV:  # another filesystem: copied below
                    raise
        pafs.copy_files(str(local), path, destination_filesystem=self.fs)

    def list(self, path: str) -> list[pafs.FileInfo]:
        """What a folder holds (nothing when it does not exist)."""
        if not self.is_dir(path):
            return []
        return sorted(self.fs.get_file_info(pafs.FileSelector(path)), key=lambda i: i.path)

    @contextlib.contextmanager
    def local_copy(self, path: str) -> Iterator[Path]:
        """A folder as a local path: itself when local, else a temporary download."""
        if self.local:
            yield Path(path)
            return
        with tempfile.TemporaryDirectory(prefix="deeplab-storage-") as tmp:
            pafs.copy_files(path, tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            yield Path(tmp)
