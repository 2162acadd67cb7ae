"""The on-disk shard format, shared by the writer (`data_tools`), the loaders and `verify`.

A shard folder holds:

- ``{dataset}-{split}-{000000}.tar``: WebDataset tars. Each sample is a run of consecutive members
  named ``{key}.{component}``; the key is 16 hex chars (see `sample_key`), the components are
  ``png`` (16-bit gray) | ``jpg`` (8-bit) | ``jp2`` (16-bit JPEG 2000) for the image, ``roi.png``
  (8-bit chest-region mask, 0/255, same aspect as the image), ``labels.npy`` (float32 vector in the
  order of the manifest's ``label_names``, NaN = unknown, -1 = uncertain) and ``json`` (metadata; its
  ``crc32`` field holds the zlib CRC-32 of each other member, see `member_checksums`).
- ``{same name}.idx`` beside each tar, in DALI's ``wds2idx`` v1.2 text format: a header line
  ``v1.2 <num_samples>`` and one line per sample, ``<ext> <data offset> <size> <member name>``
  repeated per component. DALI's ``fn.readers.webdataset`` reads it, and so does our random-access
  loader (`read_sample`), which is what makes an exact, world-size-independent sample order possible.
- ``manifest.json`` and ``skipped.jsonl`` (see `data_tools.manifest`).

Tars are written deterministically (fixed mtime/owner/mode, members in a fixed order) so the same
inputs give byte-identical shards; tar and idx are written to a temporary name and renamed, so a
crash never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = ("png", "jpg", "jp2")
ROI_EXTENSION = "roi.png"
LABELS_EXTENSION = "labels.npy"
META_EXTENSION = "json"
# Order of the members of one sample inside a tar (image first).
COMPONENT_ORDER = (*IMAGE_EXTENSIONS, ROI_EXTENSION, LABELS_EXTENSION, META_EXTENSION)
IDX_VERSION = "v1.2"
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.jsonl"


# json field: {member extension: zlib.crc32 of its bytes} for every member but the json itself.
# Both loaders check it before decoding, so bytes damaged after conversion are found the same way
# whichever decoder would read them: libjpeg inside DALI decodes a JPEG with damaged scan data into
# noise without an error, where Pillow refuses it, so the decoders alone do not agree on what is corrupt.
CHECKSUM_FIELD = "crc32"


def member_checksums(components: dict[str, bytes]) -> dict[str, int]:
    """The `CHECKSUM_FIELD` value for one sample's members (the json excluded)."""
    return {ext: zlib.crc32(data) for ext, data in components.items() if ext != META_EXTENSION}


def changed_members(components: dict[str, bytes], meta: dict) -> list[str]:
    """Members of `components` whose bytes no longer match the checksums in their json `meta`
    (none to check in shards written before the field existed)."""
    recorded = meta.get(CHECKSUM_FIELD) or {}
    return [ext for ext, crc in recorded.items() if ext in components and zlib.crc32(components[ext]) != crc]


def sample_key(dataset: str, source_id: str) -> str:
    """Stable sample key: a hash of dataset + source path, so re-running a conversion is idempotent."""
    return hashlib.sha1(f"{dataset}\0{source_id}".encode()).hexdigest()[:16]


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def idx_name_for(tar_path: str) -> str:
    """The DALI index beside a tar, as a string (name or path): the tar's suffix replaced by `.idx`.
    String operations only: a loader checks 10k shards per folder at start-up."""
    return os.path.splitext(tar_path)[0] + ".idx"


def idx_path_for(tar_path: str | Path) -> Path:
    return Path(idx_name_for(str(tar_path)))


@dataclass
class IndexedSample:
    """Where one sample's components lie inside its tar: component -> (data offset, size) in bytes."""

    key: str
    components: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def image_extension(self) -> str:
        for ext in IMAGE_EXTENSIONS:
            if ext in self.components:
                return ext
        raise ValueError(f"sample {self.key} has no image component (one of {IMAGE_EXTENSIONS})")


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/abc.roi.png' -> ('dir/abc', 'roi.png'): the key ends at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


class _HashingFile:
    """A binary file that hashes what is written through it (the tar's sha256 without reading it back)."""

    def __init__(self, path: Path):
        self._file = open(path, "wb")
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return self._file.write(data)

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()


class ShardTarWriter:
    """Writes one tar deterministically and records each member's data offset for the idx file.

    After `close()`: `num_bytes` and `sha256` of the finished tar (hashed while writing).
    """

    def __init__(self, tar_path: str | Path):
        self.tar_path = Path(tar_path)
        self._tmp_path = self.tar_path.with_name(self.tar_path.name + ".partial")
        self._file = _HashingFile(self._tmp_path)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[IndexedSample] = []
        self.num_bytes = 0
        self.sha256 = ""

    def write_sample(self, key: str, components: dict[str, bytes]) -> None:
        unknown = set(components) - set(COMPONENT_ORDER)
        if unknown:
            raise ValueError(f"unknown sample components {sorted(unknown)}; allowed: {COMPONENT_ORDER}")
        entry = IndexedSample(key)
        for ext in COMPONENT_ORDER:
            if ext not in components:
                continue
            data = components[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            # addfile() works on a copy of `info`, so the data offset is computed here: the member's
            # data starts right after its header, which starts at the archive's current end.
            header = info.tobuf(self._tar.format, self._tar.encoding, self._tar.errors)
            data_offset = self._tar.offset + len(header)
            self._tar.addfile(info, io.BytesIO(data))
            entry.components[ext] = (data_offset, len(data))
        self.samples.append(entry)

    def close(self) -> None:
        """Finish the tar, write the idx, and move both to their final names (tar last)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.num_bytes = self._tmp_path.stat().st_size
        self.sha256 = self._file.digest.hexdigest()
        write_idx(self.samples, idx_path_for(self.tar_path))
        os.replace(self._tmp_path, self.tar_path)

    def abort(self) -> None:
        """Drop the partial tar. Its end blocks are not written: on a full disk they would fail too,
        and the .partial must go all the same."""
        try:
            self._file.close()
        except OSError:
            pass
        finally:
            self._tmp_path.unlink(missing_ok=True)


def write_idx(samples: list[IndexedSample], idx_path: str | Path) -> None:
    idx_path = Path(idx_path)
    lines = [f"{IDX_VERSION} {len(samples)}"]
    for sample in samples:
        parts = [
            f"{ext} {offset} {size} {sample.key}.{ext}" for ext, (offset, size) in sample.components.items()
        ]
        lines.append(" ".join(parts))
    tmp = idx_path.with_name(idx_path.name + ".partial")
    try:
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, idx_path)
    except BaseException:  # disk full, interrupted: no half-written .partial left behind
        tmp.unlink(missing_ok=True)
        raise


def idx_sample_lines(idx_path: str | Path) -> list[str]:
    """The sample lines of a wds2idx v1.2 file, header checked (format and sample count).

    Raises ValueError naming the file on a bad header or a count that disagrees with it."""
    idx_path = Path(idx_path)
    lines = idx_path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{idx_path}: empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] != IDX_VERSION or not header[1].isdigit():
        raise ValueError(f"{idx_path}: header {lines[0]!r} is not '{IDX_VERSION} <num_samples>'")
    if len(lines) - 1 != int(header[1]):
        raise ValueError(f"{idx_path}: header says {header[1]} samples, found {len(lines) - 1}")
    return lines[1:]


def idx_line_error(idx_path: str | Path, line_no: int) -> ValueError:
    return ValueError(f"{idx_path}:{line_no}: expected groups of '<ext> <offset> <size> <name>'")


def read_idx(idx_path: str | Path) -> list[IndexedSample]:
    """Parse a wds2idx v1.2 file. Raises ValueError naming the file and line on any malformation."""
    samples = []
    for line_no, line in enumerate(idx_sample_lines(idx_path), start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise idx_line_error(idx_path, line_no)
        sample = None
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            key, _ = split_member_name(name)
            sample = sample or IndexedSample(key)
            sample.components[ext] = (int(offset), int(size))
        samples.append(sample)
    return samples


def index_tar(tar_path: str | Path) -> list[IndexedSample]:
    """Scan a tar (made by anyone) and group consecutive members into samples, as wds2idx does."""
    samples: list[IndexedSample] = []
    with tarfile.open(tar_path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if not key or key.endswith("/") or not ext:
                continue
            if not samples or samples[-1].key != key:
                samples.append(IndexedSample(key))
            samples[-1].components[ext] = (member.offset_data, member.size)
    return samples


def read_sample(
    fileobj, sample: IndexedSample, extensions: tuple[str, ...] | None = None
) -> dict[str, bytes]:
    """Read one sample's components (or only `extensions`) from an open binary tar file by their idx
    offsets."""
    out = {}
    for ext, (offset, size) in sample.components.items():
        if extensions is not None and ext not in extensions:
            continue
        fileobj.seek(offset)
        data = fileobj.read(size)
        if len(data) != size:
            raise OSError(
                f"short read for {sample.key}.{ext}: wanted {size} bytes at {offset}, got {len(data)}"
            )
        out[ext] = data
    return out
