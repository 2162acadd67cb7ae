"""`xray-shard verify` catches damage; `index` rebuilds idx files; `stats` and `preview` read a folder."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_convert import csv_archive

from data_tools.cli import main
from data_tools.convert import convert
from data_tools.index import index_tars
from data_tools.preview import preview
from data_tools.stats import folder_stats, format_stats
from data_tools.verify import verify
from xray_core.shardio import ShardTarWriter, read_idx, read_sample


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify")
    csv_archive(root / "archive", num=6)
    convert(
        root / "archive", root / "shards", long_side=48, num_workers=1, progress=False, shard_size=3, salt="s"
    )
    assert verify(root / "shards") == []
    return root / "shards"


@pytest.fixture
def damaged(clean, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(clean, out)
    return out


def _first_tar(folder: Path) -> Path:
    return sorted(folder.glob("*.tar"))[0]


def test_truncated_tar_is_caught(damaged):
    tar = _first_tar(damaged)
    tar.write_bytes(tar.read_bytes()[:-3000])
    problems = verify(damaged)
    assert any(f"{tar.name}: " in p and "bytes, manifest says" in p for p in problems)
    assert any("sha256" in p for p in problems)
    assert any("does not match the tar" in p or "undecodable" in p or "unreadable" in p for p in problems)
    assert main(["verify", str(damaged)]) == 1


def test_corrupted_png_member_is_caught(damaged):
    tar = _first_tar(damaged)
    sample = read_idx(tar.with_suffix(".idx"))[0]
    offset, size = sample.components["png"]
    data = bytearray(tar.read_bytes())
    for i in range(offset + size // 2, offset + size // 2 + 64):  # flip bytes inside the IDAT stream
        data[i] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify(damaged)
    assert any(f"{tar.name}:{sample.key}: undecodable" in p for p in problems), problems
    assert any("sha256" in p for p in problems)


def test_idx_offsets_and_manifest_counts_are_checked(damaged):
    idx = _first_tar(damaged).with_suffix(".idx")
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(int(fields[1]) + 512)
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    manifest = json.loads((damaged / "manifest.json").read_text())
    manifest["label_counts"]["train"]["cardiomegaly"]["1"] += 1
    manifest["intensity"]["mean"] += 1e-6
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    (damaged / "stray.tar").write_bytes(b"")
    problems = verify(damaged)
    assert any("does not match the tar's members/offsets" in p for p in problems)
    assert any("label counts" in p for p in problems)
    assert any(p.startswith("intensity mean") for p in problems)
    assert "stray.tar: tar on disk but not in the manifest" in problems


def test_roi_and_json_contract_are_checked(damaged):
    tar = _first_tar(damaged)
    with open(tar, "rb") as f:
        samples = [(s.key, read_sample(f, s)) for s in read_idx(tar.with_suffix(".idx"))]
    key, comps = samples[0]
    meta = json.loads(comps["json"])
    meta["photometric_note"] = "extra"
    comps["json"] = json.dumps(meta).encode()
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10), 7, np.uint8)).save(buffer, format="PNG")
    comps["roi.png"] = buffer.getvalue()
    writer = ShardTarWriter(tar)
    for k, c in samples:
        writer.write_sample(k, c)
    writer.close()
    problems = verify(damaged)
    assert any("json keys missing [], extra ['photometric_note']" in p for p in problems)
    assert any("roi.png must be 8-bit 0/255" in p for p in problems)
    assert any("roi.png is (10, 10), expected" in p for p in problems)


def test_index_rebuilds_identical_idx(damaged):
    originals = {p.name: p.read_text() for p in damaged.glob("*.idx")}
    for idx in damaged.glob("*.idx"):
        idx.unlink()
    written = index_tars([damaged])
    assert len(written) == len(originals)
    assert {p.name: p.read_text() for p in damaged.glob("*.idx")} == originals
    assert index_tars([damaged]) == {}  # existing idx files are kept
    assert main(["index", str(damaged), "--overwrite"]) == 0


def test_stats_and_preview(clean, tmp_path, capsys):
    stats = folder_stats(clean)
    assert sum(stats["sizes"].values()) == 6 and stats["intensity_policies"] == {"percentile": 6}
    text = format_stats(stats)
    assert "inputs 6: samples 6 (train 4, val 1, test 1), skipped 0" in text
    assert "cardiomegaly" in text and "intensity mean" in text
    out = preview(clean, tmp_path / "grid.png", num=5, columns=3, tile=64)
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (128, 192, 3)
    assert ((sheet[..., 0] == 255) & (sheet[..., 1] == 40)).any()  # the red chest-region box
    assert main(["stats", str(clean)]) == 0 and "samples 6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--num and --columns must be >= 1, --tile >= 32"):
        preview(clean, tmp_path / "none.png", columns=0)
    assert main(["preview", str(clean), "--out", str(tmp_path / "none.png"), "--tile", "16"]) == 2
    assert "error: --num and --columns must be >= 1, --tile >= 32" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()


def test_quick_and_parallel_verify_report_per_sample(damaged):
    assert verify(damaged, quick=True) == [] and verify(damaged, num_workers=2) == []
    tar = _first_tar(damaged)
    with open(tar, "rb") as f:
        samples = [(s.key, read_sample(f, s)) for s in read_idx(tar.with_suffix(".idx"))]
    writer = ShardTarWriter(tar)  # the same samples, the first one without its roi.png
    for i, (key, comps) in enumerate(samples):
        writer.write_sample(key, {k: v for k, v in comps.items() if i or k != "roi.png"})
    writer.close()
    quick = verify(damaged, quick=True, num_workers=2)
    assert f"{tar.name}:{samples[0][0]}: no roi.png" in quick
    assert f"{tar.name}: sha256 differs from the manifest" in quick
    assert not any("label counts" in p or "intensity" in p for p in quick)  # nothing decoded
    full = verify(damaged)
    assert f"{tar.name}:{samples[0][0]}: no roi.png" in full
    assert verify(damaged, num_workers=3) == full  # same problems, same order, whatever the workers
    assert main(["verify", "--quick", "--workers", "2", str(damaged)]) == 1


def test_quick_verify_checks_idx_offsets_and_keys(damaged):
    tars = sorted(damaged.glob("*.tar"))
    idx = tars[0].with_suffix(".idx")
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = str(tars[0].stat().st_size)  # past the end of the tar
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    second = tars[1].with_suffix(".idx")  # a key of the third shard copied into the second
    key = read_idx(tars[2].with_suffix(".idx"))[0].key
    own = read_idx(second)[0].key
    second.write_text(second.read_text().replace(own, key))
    problems = verify(damaged, quick=True)
    assert any(p.startswith(f"{tars[0].name}:") and "past the end of the" in p for p in problems), problems
    assert f"{tars[2].name}:{key}: duplicate key" in problems
