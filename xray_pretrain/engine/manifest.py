"""What a checkpoint folder held when it was written, and whether it still holds it.

Every file of a checkpoint is hashed while it is written (`RecordingCheckpointEngine`, DeepSpeed's
torch.save engine writing through a sha256), so recording costs no second read: one sha256 pass
over the bytes each rank writes anyway, in parallel over the ranks. Rank 0 then writes
`manifest.json` (name -> bytes, sha256) before the completion marker.

Verification has two prices:

- sizes (`verify_sizes`): one stat per file, done for every candidate a resume looks at;
- checksums (`verify_checksums`): one read of every byte, done only for the checkpoint about to be
  loaded (resume: split over the ranks; export and init.weights: in their one process).

A checkpoint written before manifests existed has none: it is accepted on its completion marker
alone (what "complete" meant then).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_NAME = "manifest.json"
HASH_CHUNK_BYTES = 16 << 20


class HashingWriter:
    """A write-only file object that hashes what passes through it (`torch.save` accepts it)."""

    def __init__(self, raw):
        self.raw = raw
        self.name = raw.name
        self.num_bytes = 0
        self.error: OSError | None = None  # the first failed write (torch's zip writer hides its errno)
        self._sha256 = hashlib.sha256()

    def write(self, data) -> int:
        """Write all of `data` (an unbuffered file may take part of it per call)."""
        self._sha256.update(data)
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[self.raw.write(view) :]
        except OSError as err:
            self.error = self.error or err
            raise
        self.num_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    def record(self) -> dict:
        return {"bytes": self.num_bytes, "sha256": self._sha256.hexdigest()}


def write_file(path: Path, save) -> dict:
    """`save(file_object)` into `path`, fsynced before it counts; returns {bytes, sha256}."""
    # Unbuffered: a failed write raises at that write, never later from a close that flushes a buffer.
    with open(path, "wb", buffering=0) as raw:
        writer = HashingWriter(raw)
        try:
            save(writer)
            os.fsync(raw.fileno())
        except (OSError, RuntimeError) as err:
            cause = writer.error or err  # torch's zip writer turns a failed write into a RuntimeError
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from err
    return writer.record()


def file_record(path: Path) -> dict:
    """{bytes, sha256} of a file already on disk (one read)."""
    sha256 = hashlib.sha256()
    num_bytes = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            sha256.update(chunk)
            num_bytes += len(chunk)
    return {"bytes": num_bytes, "sha256": sha256.hexdigest()}


def recording_engine(engine):
    """Give a DeepSpeed engine a checkpoint engine that records what it writes (installed once).

    A write that fails (a full disk, a file-size limit) is recorded, not raised: DeepSpeed's save
    has barriers after the writes, and a rank that raised would leave the others waiting there.
    The caller reads `.error` after `save_checkpoint` returns on every rank, and all agree."""
    if not isinstance(engine.checkpoint_engine, RecordingCheckpointEngine):
        engine.checkpoint_engine = RecordingCheckpointEngine(engine.checkpoint_engine)
        # DeepSpeed copies its zero_to_fp32 scripts beside the checkpoints outside the checkpoint
        # engine; on a full disk that copy must be recorded like any other write.
        engine._copy_recovery_script = _recorded(engine._copy_recovery_script, engine.checkpoint_engine)
    return engine.checkpoint_engine


class RecordingCheckpointEngine:
    """DeepSpeed's checkpoint engine (torch.save), writing each file through a sha256 and an fsync;
    everything else (load, create, commit, ...) is the wrapped engine's."""

    def __init__(self, wrapped):
        self.wrapped = wrapped
        self.files: dict[str, dict] = {}
        self.error: OSError | None = None

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    def start(self) -> None:
        self.files, self.error = {}, None

    def makedirs(self, path, exist_ok=False) -> None:
        if self.error is None:
            try:
                self.wrapped.makedirs(path, exist_ok=exist_ok)
            except OSError as err:
                self.error = err

    def save(self, state_dict, path: str) -> None:
        import torch

        if self.error is not None:
            return  # this checkpoint is lost already; the rest of its files would be too
        zip_format = getattr(self.wrapped, "zipfile_serialization", True)
        try:
            self.files[os.path.basename(path)] = write_file(
                Path(path), lambda f: torch.save(state_dict, f, _use_new_zipfile_serialization=zip_format)
            )
        except OSError as err:
            self.error = err


def _recorded(function, recorder: RecordingCheckpointEngine):
    def call(*args, **kwargs):
        if recorder.error is not None:
            return None
        try:
            return function(*args, **kwargs)
        except OSError as err:
            recorder.error = err
            return None

    return call


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash leaves the old content or the new, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power loss only once its folder is synced
    finally:
        os.close(folder)


def write_manifest(tag_dir: Path, records: dict[str, dict]) -> None:
    """manifest.json: every file of the checkpoint -> {bytes, sha256} (written before the marker)."""
    write_atomic(tag_dir / MANIFEST_NAME, json.dumps({"files": dict(sorted(records.items()))}, indent=1))


def read_manifest(tag_dir: Path) -> dict[str, dict] | None:
    path = tag_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())["files"]


def verify_sizes(tag_dir: Path) -> str | None:
    """None when every file of the manifest is there with its size; else what is wrong."""
    records = read_manifest(tag_dir)
    for name, record in (records or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} has {size:,} bytes, {record['bytes']:,} were written"
    return None


def verify_checksums(tag_dir: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when this rank's share of the files (every world_size-th, by name) hash as written."""
    records = read_manifest(tag_dir) or {}
    for name in sorted(records)[rank::world_size]:
        if file_record(tag_dir / name)["sha256"] != records[name]["sha256"]:
            return f"{name} differs from what was written (sha256)"
    return None
