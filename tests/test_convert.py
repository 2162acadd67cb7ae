"""`xray-shard convert` end to end: csv and folder sources, formats, privacy, determinism, resume."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_dicom import stored_chest, write_dicom

from data_tools.convert import convert
from data_tools.verify import verify
from xray_core.shardindex import INDEX_NAME
from xray_core.shardio import index_tar, read_idx, read_sample, sample_key

LABELS = ["cardiomegaly", "effusion"]
SALT = "test-salt"


def csv_archive(root: Path, num: int = 6) -> Path:
    """`num` hand-made DICOMs (MONOCHROME1/2, 12/14-bit, non-square) and a labels.csv."""
    rows = []
    for i in range(num):
        photometric = "MONOCHROME1" if i % 3 == 2 else "MONOCHROME2"
        bits = 12 if i % 2 else 14
        stored = stored_chest(photometric, bits, seed=i, shape=(96, 80 if i % 2 else 96))
        rel = f"images/p{i // 2}/{i}.dcm"
        write_dicom(
            root / rel, stored, PhotometricInterpretation=photometric, BitsStored=bits, HighBit=bits - 1
        )
        split = ["train", "train", "train", "val", "test", "train"][i % 6]
        labels = [str(i % 2), "" if i == 3 else "-1" if i == 4 else "0"]
        rows.append(
            [
                rel,
                f"PATIENT-{i // 2:03d}",
                f"STUDY-{i}",
                "PA" if i % 4 else "AP",
                split,
                *labels,
                f"report {i}",
            ]
        )
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "patient_id", "study_id", "view", "split", *LABELS, "report"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return csv_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def shards(archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "out"
    convert(
        archive, out, long_side=64, num_workers=1, progress=False, dataset="hand", shard_size=2, salt=SALT
    )
    return out


def _samples(folder: Path) -> dict[str, dict[str, bytes]]:
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            for sample in read_idx(tar.with_suffix(".idx")):
                found[sample.key] = read_sample(f, sample)
    return found


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the loaders' index: a cache that records file stats (inode, mtime)
    so that it knows when to rebuild; it must exist, its content is not the conversion's output."""
    assert (folder / INDEX_NAME).is_file()
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != INDEX_NAME}


def test_csv_conversion_end_to_end(archive, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert verify(shards) == []
    assert manifest["num_inputs"] == 6 and manifest["num_samples"] == 6 and manifest["num_skipped"] == 0
    assert manifest["splits"] == {"train": 4, "val": 1, "test": 1}
    assert manifest["label_names"] == LABELS
    assert manifest["label_counts"]["val"]["effusion"] == {"1": 0, "0": 0, "-1": 0, "null": 1}
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1, 1]
    assert manifest["shards"][0]["name"] == "hand-train-000000.tar"
    assert (shards / "hand-train-000000.idx").is_file()
    samples = _samples(shards)
    rows = list(csv.DictReader(open(archive / "labels.csv")))
    for row in rows:
        comps = samples[sample_key("hand", row["path"])]
        meta = json.loads(comps["json"])
        labels = np.load(io.BytesIO(comps["labels.npy"]))
        expected = [np.nan if row[n] == "" else float(row[n]) for n in LABELS]
        np.testing.assert_array_equal(labels, np.array(expected, dtype=np.float32))
        assert meta["split"] == row["split"] and meta["view"] == row["view"]
        assert meta["report"] == {"findings": row["report"], "impression": ""}
        assert max(meta["size"]) == 64 and meta["original_size"][0] == 96
        image = Image.open(io.BytesIO(comps["png"]))
        assert image.mode == "I;16" and list(image.size[::-1]) == meta["size"]
        r = np.asarray(image)
        assert r[:2].mean() < r[30:40, 28:36].mean()  # air dark, mediastinum bright, MONOCHROME1 too


def test_privacy_no_clear_ids_or_paths_in_any_tar_byte(archive, shards):
    data = b"".join(
        (shards / m["name"]).read_bytes()
        for m in json.loads((shards / "manifest.json").read_text())["shards"]
    )
    for needle in [b"PATIENT-", b"STUDY-", b"PAT-CLEAR-ID", b"images/", str(archive).encode(), SALT.encode()]:
        assert needle not in data, needle
    manifest_text = (shards / "manifest.json").read_text()
    assert SALT not in manifest_text and "PATIENT-" not in manifest_text
    id_map = list(csv.DictReader(open(shards / "id_map.csv")))
    assert len(id_map) == 6 and all(Path(r["source_path"]).is_file() for r in id_map)
    meta = json.loads(next(iter(_samples(shards).values()))["json"])
    assert len(meta["patient"]) == 16 and "source_path" not in meta


def test_workers_and_reruns_give_identical_bytes(archive, shards, tmp_path):
    out = tmp_path / "w2"
    convert(
        archive, out, long_side=64, num_workers=2, progress=False, dataset="hand", shard_size=2, salt=SALT
    )
    assert _folder_bytes(out) == _folder_bytes(shards)
    convert(
        archive, out, long_side=64, num_workers=2, progress=False, dataset="hand", shard_size=2, salt=SALT
    )
    assert _folder_bytes(out) == _folder_bytes(shards)


def test_resume_after_deleted_or_truncated_shard(archive, shards, tmp_path):
    out = tmp_path / "resume"
    shutil.copytree(shards, out)
    (out / "hand-train-000001.tar").unlink()
    truncated = out / "hand-val-000000.tar"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (out / "manifest.json").unlink()
    convert(
        archive, out, long_side=64, num_workers=1, progress=False, dataset="hand", shard_size=2, salt=SALT
    )
    assert _folder_bytes(out) == _folder_bytes(shards)


def test_resume_after_kill_mid_run(tmp_path):
    archive = csv_archive(tmp_path / "archive", num=24)
    args = [
        "--input",
        str(archive),
        "--long-side",
        "64",
        "--shard-size",
        "2",
        "--workers",
        "1",
        "--salt",
        SALT,
    ]
    reference = tmp_path / "reference"
    convert(archive, reference, long_side=64, num_workers=1, progress=False, shard_size=2, salt=SALT)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "data_tools.cli", "convert", *args, "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(command, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while len(list(out.glob("*.tar"))) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    convert(archive, out, long_side=64, num_workers=1, progress=False, shard_size=2, salt=SALT)
    assert _folder_bytes(out) == _folder_bytes(reference)
    assert verify(out) == []


def test_folder_source_accounts_for_every_file(tmp_path):
    root = tmp_path / "in"
    write_dicom(root / "a/chest.dcm", stored_chest())
    write_dicom(root / "a/no_extension", stored_chest(seed=3))
    write_dicom(root / "b/knee.dcm", stored_chest(), BodyPartExamined="KNEE")
    Image.fromarray((stored_chest(bits=16)).astype(np.uint16)).save(root / "b/sixteen.png")
    (root / "c").mkdir()
    Image.fromarray(np.dstack([stored_chest(bits=8).astype(np.uint8)] * 3)).save(root / "c/rgb.jpg")
    (root / "c/notes.txt").write_text("not an image")
    (root / "c/empty.dcm").write_bytes(b"")
    manifest = convert(root, tmp_path / "out", source="folder", long_side=64, num_workers=1, progress=False)
    skipped = {
        json.loads(line)["source_id"]: json.loads(line)["reason"]
        for line in open(tmp_path / "out/skipped.jsonl")
    }
    assert manifest["num_inputs"] == 7 and manifest["num_samples"] == 4
    assert skipped["b/knee.dcm"].startswith("filtered: BodyPartExamined KNEE")
    assert skipped["c/notes.txt"].startswith("not a DICOM or image file")
    assert skipped["c/empty.dcm"] == "empty file (0 bytes)"
    assert verify(tmp_path / "out") == []


def test_user_errors_are_reported_before_any_work(archive, shards, tmp_path):
    with pytest.raises(ValueError, match="unknown convert option"):
        convert(archive, tmp_path / "o1", progress=False, colour="red")
    with pytest.raises(ValueError, match="not both"):
        convert(archive, tmp_path / "o2", progress=False, shard_size=2, shard_bytes=10_000)
    with pytest.raises(ValueError, match="--quality 80: only for --format jpg"):
        convert(archive, tmp_path / "o4", progress=False, quality=80)
    with pytest.raises(ValueError, match="--path-column do\\(es\\) not apply to --source folder"):
        convert(archive, tmp_path / "o5", source="folder", progress=False, path_column="file")
    with pytest.raises(ValueError, match="inside --input"):
        convert(archive, archive / "out", source="folder", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        convert(archive, foreign, progress=False)
    with pytest.raises(ValueError, match="holds a conversion with other inputs or options"):
        convert(
            archive,
            shards,
            long_side=32,
            num_workers=1,
            progress=False,
            dataset="hand",
            shard_size=2,
            salt=SALT,
        )
    bad = tmp_path / "bad"
    shutil.copytree(archive, bad)
    text = (bad / "labels.csv").read_text().replace(",1,0,report 1", ",2,0,report 1")
    (bad / "labels.csv").write_text(text)
    with pytest.raises(ValueError, match="labels.csv:3 column cardiomegaly: label value '2'"):
        convert(bad, tmp_path / "o3", progress=False)
    assert not (tmp_path / "o3").exists()


def test_cli_convert_and_verify(archive, tmp_path):
    from data_tools.cli import main

    out = tmp_path / "cli"
    assert main(["convert", "--input", str(archive), "--out", str(out), "--long-side", "48", "--workers", "1",
                 "--no-progress", "--salt", SALT]) == 0  # fmt: skip
    assert main(["verify", str(out)]) == 0
    assert all(len(s.key) == 16 for s in index_tar(next(out.glob("*.tar"))))
    assert os.path.getsize(out / "skipped.jsonl") == 0


def test_jp2_is_lossless_and_jpg_close_to_png16(archive, shards, tmp_path):
    png = {k: np.asarray(Image.open(io.BytesIO(c["png"]))) for k, c in _samples(shards).items()}
    for image_format, ext in (("jp2", "jp2"), ("jpg", "jpg")):
        out = tmp_path / image_format
        manifest = convert(
            archive,
            out,
            image_format=image_format,
            long_side=64,
            num_workers=1,
            progress=False,
            shard_size=2,
            salt=SALT,
            dataset="hand",
        )
        assert verify(out) == [] and manifest["image_format"] == image_format
        for key, comps in _samples(out).items():
            image = Image.open(io.BytesIO(comps[ext]))
            pixels = np.asarray(image)
            if image_format == "jp2":
                assert image.mode == "I;16" and np.array_equal(pixels, png[key])
            else:
                assert (
                    image.mode == "L" and np.abs(pixels - png[key] / 257.0).mean() < 3
                )  # q95 on noisy 64-px images
        assert {s["name"] for s in manifest["shards"]} == {p.name for p in shards.glob("*.tar")}


@pytest.mark.parametrize("image_format, ext", [("png16", "png"), ("jpg", "jpg"), ("jp2", "jp2")])
def test_dali_decodes_what_pillow_decodes(archive, tmp_path, image_format, ext):
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, types

    out = tmp_path / image_format
    convert(archive, out, image_format=image_format, long_side=64, num_workers=1, progress=False, salt=SALT)
    tars = sorted(str(p) for p in out.glob("*.tar"))

    @dali.pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipeline():
        encoded = fn.readers.webdataset(paths=tars, index_paths=[t[:-4] + ".idx" for t in tars], ext=[ext])
        dtype = types.UINT8 if ext == "jpg" else types.UINT16
        return fn.decoders.image(encoded, device="cpu", output_type=types.GRAY, dtype=dtype), encoded

    pipe = pipeline()
    pipe.build()
    for _ in range(6):
        decoded, encoded = pipe.run()
        pillow = np.asarray(Image.open(io.BytesIO(np.asarray(encoded.as_tensor())[0].tobytes())))
        np.testing.assert_array_equal(np.asarray(decoded.as_tensor())[0, ..., 0], pillow)


def test_dedup_skips_identical_pixels(tmp_path):
    root = tmp_path / "in"
    write_dicom(root / "a.dcm", stored_chest(seed=1))
    write_dicom(root / "copy_of_a.dcm", stored_chest(seed=1))
    write_dicom(root / "b.dcm", stored_chest(seed=2))
    manifest = convert(
        root, tmp_path / "out", source="folder", long_side=64, num_workers=1, progress=False, dedup=True
    )
    assert manifest["num_samples"] == 2
    [line] = (tmp_path / "out/skipped.jsonl").read_text().splitlines()
    skip = json.loads(line)
    # Both files share one patient (PAT-CLEAR-ID), so one split: the first in key order is kept.
    keys = {name: sample_key("folder", name) for name in ("a.dcm", "copy_of_a.dcm")}
    kept, dropped = sorted(keys, key=keys.get)
    assert skip == {"source_id": dropped, "dataset": "folder", "reason": f"duplicate of {keys[kept]}"}


def test_dry_run_writes_nothing_and_projects_bytes(archive, tmp_path):
    report = convert(
        archive, tmp_path / "dry", long_side=64, num_workers=1, progress=False, dry_run=True, shard_size=4
    )
    assert not (tmp_path / "dry").exists()
    assert report["num_inputs"] == 6 and report["num_records"] == 6 and report["num_shards_planned"] == 3
    assert report["probe"]["num_ok"] == 6 and report["projected_num_samples"] == 6
    assert 0.8 < report["projected_bytes"] / (6 * report["mean_sample_bytes"]) < 1.2


def test_shard_bytes_sets_a_deterministic_shard_size(archive, tmp_path):
    first = convert(
        archive, tmp_path / "a", long_side=64, num_workers=1, progress=False, shard_bytes=50_000, salt=SALT
    )
    second = convert(
        archive, tmp_path / "b", long_side=64, num_workers=2, progress=False, shard_bytes=50_000, salt=SALT
    )
    assert first == second and first["options"]["shard_size"] >= 1
    # A tar is padded to 10240-byte records; within that, no shard overshoots the target by a sample.
    assert all(s["num_bytes"] <= 50_000 + 10_240 for s in first["shards"])
    assert len(first["shards"]) < 6


def test_views_filter_and_keep_paths(archive, tmp_path):
    manifest = convert(
        archive,
        tmp_path / "o",
        long_side=64,
        num_workers=1,
        progress=False,
        views="AP",
        keep_paths=True,
        salt=SALT,
    )
    assert manifest["num_samples"] == 2  # rows 0 and 4 are AP
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "o/skipped.jsonl")]
    assert reasons == ["filtered: view PA not in --views AP"] * 4
    meta = json.loads(next(iter(_samples(tmp_path / "o").values()))["json"])
    assert meta["source_path"].startswith(str(archive)) and meta["patient_id"].startswith("PATIENT-")
    assert verify(tmp_path / "o") == []


def _square_or_die(task: int) -> int:
    if task == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # what a segfault in a native decoder does to a worker
    return task * task


def test_pool_survives_a_worker_crash_and_keeps_order():
    from data_tools.convert import OrderedPool

    with OrderedPool(_square_or_die, 2, crash_result=lambda task: f"crashed on {task}") as pool:
        assert list(pool.map(range(8))) == [0, 1, 4, "crashed on 3", 16, 25, 36, 49]
        assert list(pool.map([5, 6])) == [25, 36]  # the pool is reused after recovery


def test_phantom_labels_csv_converts(tmp_path):
    from data_tools.synth import synthesize

    synthesize(tmp_path / "phantom", num_images=8, size=64, seed=3, progress=False)
    manifest = convert(
        tmp_path / "phantom", tmp_path / "out", long_side=48, num_workers=1, progress=False, salt=SALT
    )
    rows = {row["path"]: row for row in csv.DictReader(open(tmp_path / "phantom/labels.csv"))}
    assert manifest["num_samples"] == 8 and manifest["label_names"] == list(next(iter(rows.values())))[5:10]
    assert verify(tmp_path / "out") == []
    for key, comps in _samples(tmp_path / "out").items():
        meta = json.loads(comps["json"])
        row = next(r for p, r in rows.items() if sample_key("csv", p) == key)
        assert meta["split"] == row["split"]
        assert row["report"].endswith(meta["report"]["impression"]) and meta["report"]["impression"]
        assert "IMPRESSION" not in meta["report"]["findings"]
