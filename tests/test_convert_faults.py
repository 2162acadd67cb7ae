"""Faults injected into `xray-shard convert` for real: fuzzed DICOMs, SIGKILL of the converter and of a
worker, Ctrl-C, a full disk, and the inputs a new user tried. Each test asserts what was reported and
that nothing was lost: every input is a sample or a skipped line, `verify` passes, and the bytes equal
an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from test_convert import SALT, _folder_bytes, csv_archive
from test_dicom import stored_chest, write_dicom
from test_sources import make_nih
from test_sources import run as list_source

from data_tools.convert import convert
from data_tools.verify import verify

CONVERT = [sys.executable, "-m", "data_tools.cli", "convert", "--no-progress", "--salt", SALT]
ANY_HEADER = {"modalities": "any", "body_parts": "any"}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_every_input_accounted(out: Path, manifest: dict, num_inputs: int) -> dict[str, str]:
    """Each input exactly once: as a sample (id_map.csv) or a skipped line with a reason."""
    skipped = {s["source_id"]: s["reason"] for s in _lines(out / "skipped.jsonl")}
    rows = (out / "id_map.csv").read_text().splitlines()[1:]
    sampled = {row.split(",")[3] for row in rows}
    assert manifest["num_inputs"] == num_inputs
    assert manifest["num_samples"] + manifest["num_skipped"] == num_inputs
    assert len(sampled) == manifest["num_samples"] and len(skipped) == manifest["num_skipped"]
    assert not sampled & set(skipped) and all(skipped.values())
    assert verify(out) == []
    return skipped


# ---- 6. fuzzed DICOMs ---------------------------------------------------------------------------------
def _base_files() -> dict[str, bytes]:
    """Real DICOMs of several encodings: a 14-bit chest CR, JPEG 2000, RLE, RGB, big endian; the
    corpus's DICOMs are fuzzed by test_corpus-style runs where present (they are large)."""
    names = ["JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "MR_small_bigendian.dcm"]
    files = {name: Path(get_testdata_file(name)).read_bytes() for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_dicom(Path(tmp) / "chest.dcm", stored_chest(bits=14, shape=(96, 80)), BitsStored=14)
        files["chest.dcm"] = Path(path).read_bytes()
    return files


BASE_FILES = _base_files()
HEADER_VALUES = {
    "BitsStored": st.sampled_from([0, 1, 17, 33, 255]),  # > BitsAllocated, or none
    "BitsAllocated": st.sampled_from([0, 1, 7, 12, 64]),
    "Rows": st.sampled_from([0, 1, 65535]),
    "Columns": st.sampled_from([0, 1, 65535]),
    "WindowWidth": st.sampled_from([-100, 0, 1e-30]),
    "PhotometricInterpretation": st.sampled_from(["MONOCHROME3", "RGB", "PALETTE COLOR", "YBR_FULL", ""]),
    "SamplesPerPixel": st.sampled_from([0, 2, 3, 4]),
    "NumberOfFrames": st.sampled_from(["0", "-5", "1000000", "x"]),
    "PixelRepresentation": st.sampled_from([1, 2]),
    "RescaleSlope": st.sampled_from([0, -1, 1e30]),
}
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("header"), st.sampled_from(sorted(HEADER_VALUES)), st.data()),
    st.tuples(st.just("syntax"), st.sampled_from(["1.2.3.4.5", "1.2.840.10008.1.2.4.90", ""]), st.just(0)),
)


def mutate(data: bytes, mutations, path: Path) -> None:
    """Apply byte flips, a truncation, header values or a bogus transfer syntax to `data` -> `path`."""
    for kind, where, value in mutations:
        if kind == "flip" and data:
            position = min(int(where * len(data)), len(data) - 1)
            data = data[:position] + bytes([value]) + data[position + 1 :]
        elif kind == "truncate":
            data = data[: int(where * len(data))]
        elif kind in ("header", "syntax"):
            try:
                ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data), force=True)
                if kind == "syntax":
                    ds.file_meta.TransferSyntaxUID = where
                else:
                    setattr(ds, where, value.draw(HEADER_VALUES[where]))
                buffer = pydicom.filebase.DicomBytesIO()
                ds.save_as(buffer, enforce_file_format=False)
                data = buffer.getvalue()
            except Exception:
                continue  # pydicom will not write this combination: the bytes stay as they were
    path.write_bytes(data)


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,  # the same cases on every CI run; raise max_examples locally to search wider
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    cases=st.lists(
        st.tuples(st.sampled_from(sorted(BASE_FILES)), st.lists(MUTATION, min_size=1, max_size=3)),
        min_size=3,
        max_size=6,
    )
)
def test_fuzzed_dicoms_each_become_a_sample_or_a_skip_with_a_reason(cases):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        root.mkdir()
        for i, (name, mutations) in enumerate(cases):
            mutate(BASE_FILES[name], mutations, root / f"{i:02d}-{name}")
        (root / "intact.dcm").write_bytes(BASE_FILES["chest.dcm"])  # at least one sample
        out = Path(tmp) / "out"
        manifest = convert(
            root, out, source="folder", long_side=32, num_workers=2, progress=False, salt=SALT,
            max_pixels=2_000_000, decode_timeout=60, **ANY_HEADER,
        )  # fmt: skip
        skipped = assert_every_input_accounted(out, manifest, len(cases) + 1)
        assert "intact.dcm" not in skipped
        for reason in skipped.values():
            assert "worker process died" not in reason, reason  # a native crash would be a finding


def test_pixel_limit_and_decode_timeout_are_options(tmp_path):
    root = tmp_path / "in"
    write_dicom(root / "big.dcm", stored_chest(shape=(96, 80)))
    write_dicom(root / "small.dcm", stored_chest(shape=(40, 40)))
    convert(root, tmp_path / "out", source="folder", long_side=32, num_workers=1, progress=False,
            salt=SALT, max_pixels=40 * 40, **ANY_HEADER)  # fmt: skip
    skipped = {s["source_id"]: s["reason"] for s in _lines(tmp_path / "out" / "skipped.jsonl")}
    assert skipped == {"big.dcm": "image of 96 x 80 = 7,680 pixels exceeds --max-pixels 1,600"}
    from data_tools.convert import DecodeTimeout, _time_limit

    with pytest.raises(DecodeTimeout), _time_limit(0.2):
        time.sleep(2)
    with pytest.raises(ValueError, match="--decode-timeout must be > 0"):
        convert(root, tmp_path / "o2", source="folder", progress=False, decode_timeout=0)


# ---- 7. SIGKILL of the converter (parent) and of one worker -------------------------------------------
@pytest.fixture(scope="module")
def big_archive(tmp_path_factory) -> tuple[Path, Path]:
    """96 DICOMs in shards of 2 and the uninterrupted reference conversion. (With 48, a quiet machine
    finished the conversion before a Ctrl-C sent after the first tar took effect.)"""
    root = tmp_path_factory.mktemp("faults")
    archive = csv_archive(root / "archive", num=96)
    reference = root / "reference"
    convert(archive, reference, long_side=64, num_workers=1, progress=False, shard_size=2, salt=SALT)
    return archive, reference


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _start(archive: Path, out: Path, **popen) -> subprocess.Popen:
    """The CLI with 2 workers; its output goes to files beside `out` (a pipe would stay open, and a
    test hang, as long as any orphan held it)."""
    args = ["--input", str(archive), "--out", str(out), "--long-side", "64", "--shard-size", "2"]
    log = open(out.with_name(out.name + ".log"), "w")
    return subprocess.Popen([*CONVERT, *args, "--workers", "2"], stdout=log, stderr=log, **popen)


def _output(out: Path) -> str:
    return out.with_name(out.name + ".log").read_text()


def _wait_for_tars(proc: subprocess.Popen, out: Path, num_tars: int = 1) -> None:
    deadline = time.time() + 120
    while len(list(out.glob("*.tar"))) < num_tars and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before the fault could be injected"


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process trees from /proc")
def test_sigkill_of_the_converter_leaves_no_process_and_a_rerun_completes(big_archive, tmp_path):
    archive, reference = big_archive
    out = tmp_path / "killed"
    proc = _start(archive, out)
    _wait_for_tars(proc, out)
    helpers = _descendants(proc.pid)  # forkserver, its workers, the resource tracker
    assert len(helpers) >= 3, helpers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while _alive(helpers) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(helpers), f"left running after SIGKILL of the converter: {_alive(helpers)}"
    assert not (out / "manifest.json").exists()
    convert(archive, out, long_side=64, num_workers=2, progress=False, shard_size=2, salt=SALT)
    assert _folder_bytes(out) == _folder_bytes(reference) and verify(out) == []


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads process trees from /proc")
def test_sigkill_of_a_worker_loses_nothing(big_archive, tmp_path):
    archive, reference = big_archive
    out = tmp_path / "worker"
    proc = _start(archive, out)
    _wait_for_tars(proc, out)
    forkserver_children = [p for p in _descendants(proc.pid) if _descendants(p) and p in _alive({p})]
    workers = set().union(*(_descendants(p) for p in forkserver_children)) if forkserver_children else set()
    assert workers, "no worker process found"
    os.kill(min(workers), signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, _output(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_skipped"] == 0  # the killed worker's files were converted again
    assert _folder_bytes(out) == _folder_bytes(reference) and verify(out) == []


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_prints_one_line_and_the_rerun_completes(big_archive, tmp_path):
    archive, reference = big_archive
    out = tmp_path / "interrupted"
    # As from a shell: Ctrl-C not ignored. (A child inherits an ignored SIGINT, and Python then installs
    # no KeyboardInterrupt handler; something earlier in the suite leaves it ignored in this process.)
    proc = _start(archive, out, start_new_session=True, preexec_fn=_default_sigint)
    _wait_for_tars(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the whole foreground group
    assert proc.wait(timeout=120) == 130
    assert _output(out).strip().splitlines() == [
        "xray-shard convert: interrupted; finished shards are kept: run the same command again to resume"
    ]
    convert(archive, out, long_side=64, num_workers=1, progress=False, shard_size=2, salt=SALT)
    assert _folder_bytes(out) == _folder_bytes(reference) and verify(out) == []


# ---- 8. disk full during a conversion ---------------------------------------------------------------
@contextmanager
def small_disk(path: Path, num_bytes: int):
    """A tmpfs of `num_bytes` at `path`, or None where this machine cannot mount one (not root)."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={num_bytes}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_disk_full_is_one_clear_line_and_a_rerun_with_space_completes(big_archive, tmp_path):
    archive, reference = big_archive
    total = sum(p.stat().st_size for p in reference.iterdir() if p.is_file())
    args = ["--input", str(archive), "--long-side", "64", "--shard-size", "2", "--workers", "1"]
    with small_disk(tmp_path / "disk", total // 2) as disk:
        if disk is not None:  # a real ENOSPC
            out = disk / "out"
            proc = subprocess.run([*CONVERT, *args, "--out", str(out)], capture_output=True, text=True)
        else:  # no mount here: a per-file size limit gives EFBIG on the largest shard instead
            out = tmp_path / "out"
            limit = max(p.stat().st_size for p in reference.glob("*.tar")) - 1

            def limited():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

            proc = subprocess.run([*CONVERT, *args, "--out", str(out)], capture_output=True, text=True,
                                  preexec_fn=limited)  # fmt: skip
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("xray-shard convert: error: ") and "run the same command again" in line
        assert ("free space" if disk else "ulimit -f") in line
        assert not list(out.rglob("*.partial")) and not (out / "manifest.json").exists()
        finished = [json.loads(p.read_text()) for p in (out / ".xray-shard/shards").glob("*.json")]
        assert any(s["num_samples"] for s in finished) or disk is None  # the size limit may hit shard 0
        for state in finished:  # each finished shard is whole: the same bytes as the reference's
            assert (out / state["name"]).read_bytes() == (reference / state["name"]).read_bytes()
        space = tmp_path / "space"
        shutil.copytree(out, space)
    convert(archive, space, long_side=64, num_workers=1, progress=False, shard_size=2, salt=SALT)
    assert _folder_bytes(space) == _folder_bytes(reference) and verify(space) == []


# ---- found when tried as a new user would ------------------------------------------------------------
def test_unwritable_or_wrong_out_and_empty_inputs_are_one_clear_error(big_archive, tmp_path):
    archive, _ = big_archive
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        convert(archive, tmp_path / "a_file", progress=False, salt=SALT)
    with pytest.raises(ValueError, match="is a file; give a folder"):
        convert(archive, tmp_path / "a_file" / "below", progress=False, salt=SALT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no input files found for --source folder"):
        convert(tmp_path / "empty", tmp_path / "o1", source="folder", progress=False, salt=SALT)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="none of the 1 inputs became a sample"):
        convert(tmp_path / "text", tmp_path / "o2", source="folder", progress=False, salt=SALT)
    assert not (tmp_path / "o2" / "manifest.json").exists()  # no manifest with intensity std 0
    with small_disk(tmp_path / "ro", 1 << 20) as disk:
        if disk is None:
            pytest.skip("cannot mount a read-only file system here")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        proc = subprocess.run([*CONVERT, "--input", str(archive), "--out", str(disk / "out")],
                              capture_output=True, text=True)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"xray-shard convert: error: --out {disk / 'out'}: {disk} is not writable "
            "(read-only file system or permissions)"
        ]


def test_accounting_of_truncated_rgb_and_symlinked_inputs(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    j2k = Path(get_testdata_file("JPEG2000.dcm")).read_bytes()
    (root / "truncated_j2k.dcm").write_bytes(j2k[: int(len(j2k) * 0.6)])
    shutil.copy(get_testdata_file("SC_rgb_dcmtk_+eb+cr.dcm"), root / "rgb.dcm")
    os.symlink("does_not_exist.dcm", root / "broken.dcm")
    write_dicom(root / "chest.dcm", stored_chest())
    manifest = convert(root, tmp_path / "out", source="folder", long_side=32, num_workers=1, progress=False,
                       salt=SALT, **ANY_HEADER)  # fmt: skip
    skipped = assert_every_input_accounted(tmp_path / "out", manifest, 4)
    assert skipped["truncated_j2k.dcm"] == "truncated file: the file ends before its pixel data is complete"
    assert skipped["broken.dcm"] == "broken symlink -> does_not_exist.dcm: target does not exist"
    from test_convert import _samples

    flags = {
        json.loads(c["json"])["photometric"]: json.loads(c["json"])["flags"]
        for c in _samples(tmp_path / "out").values()
    }
    assert "color_to_gray" in flags["RGB->gray"]


def test_a_symlink_loop_adds_no_inputs(tmp_path):
    make_nih(tmp_path / "plain")
    records, skips = list_source("nih-cxr14", tmp_path / "plain")
    make_nih(tmp_path / "loop")
    os.symlink(tmp_path / "loop" / "images_001", tmp_path / "loop" / "images_001" / "images" / "again")
    looped_records, looped_skips = list_source("nih-cxr14", tmp_path / "loop")
    assert (len(looped_records), len(looped_skips)) == (len(records), len(skips)) == (6, 2)
