"""`xray-shard convert`: DICOM/PNG/JPEG archives + labels -> WebDataset shards (see shardio for the format).

Steps (`convert_folder`):
  1. the source adapter lists records (one Record or Skip per input), options are checked
  2. records without patient ids get them from their DICOM header (so splits are by patient)
  3. every record gets its key and split; shards are planned up front (writer.plan_shards)
  4. shards not yet complete are written: worker processes decode/resize/encode in key order
     (encode.build_sample), the main process writes tars in that order (writer.ShardBuilder)
  5. manifest.json, skipped.jsonl and id_map.csv are assembled from the shard states.

Same inputs and options -> byte-identical tars and manifest, whatever --workers; a rerun after an
interruption writes only the missing shards. Library use: `convert(input_dir, out_dir, ...)`, or
`convert_folder(ConvertOptions(...))`; the CLI parses its flags into the same `ConvertOptions`.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from data_tools.encode import DEFAULT_QUALITY, IMAGE_FORMATS, PNG_LEVEL, Sample, SampleOptions
from data_tools.manifest import (
    DEFAULT_SALT,
    build_manifest,
    salt_fingerprint,
    write_id_map,
    write_manifest,
    write_skipped,
)
from data_tools.records import SPLITS, Record, Skip, split_for_patient
from data_tools.sources import SOURCES, get_source
from data_tools.version import TOOL_VERSION
from data_tools.writer import ShardBuilder, ShardState, StateStore, plan_shards
from xray_core.images import DEFAULT_MAX_PIXELS, FRAME_POLICIES, INTENSITY_POLICIES, DecodeOptions
from xray_core.shardindex import index_folder
from xray_core.shardio import sample_key

DEFAULT_SHARD_SIZE = 1000
SHARD_BYTES_SAMPLE = 16  # records encoded to estimate bytes per sample for --shard-bytes / --dry-run
DEFAULT_DECODE_TIMEOUT_S = 300.0
# A decoder stuck inside native code never sees the soft timeout (a Python exception): the worker then
# exits this long after it, and the pool reports the file as the one that killed its worker.
HARD_TIMEOUT_GRACE_S = 30.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
DATASET_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class ConvertOptions:
    """Everything one conversion needs; the CLI flags map one to one (`--long-side` -> long_side).

    `source_options` holds the chosen `--source`'s own options by their argparse names (e.g.
    `labels_csv` for `csv`); options it leaves out take the adapter's defaults.
    """

    input: Path
    out: Path
    source: str = "csv"
    dataset: str | None = None  # default: the source's
    image_format: str = "png16"
    quality: int | None = None  # JPEG quality, --format jpg only
    long_side: int = 1280
    upsample: bool = False
    intensity: str = "percentile"
    shard_size: int | None = None
    shard_bytes: int | None = None
    salt: str | None = None  # None: the public default salt (with a warning)
    keep_paths: bool = False
    dedup: bool = False
    modalities: str = "CR,DX"
    body_parts: str = "CHEST,THORAX,ABSENT"
    allow_for_processing: bool = False
    views: str = "any"
    frames: str = "first"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped before decoding
    num_workers: int | None = None  # decode processes; None: all cores
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT_S  # seconds per file before it is skipped
    part: tuple[int, int] | None = None  # (I, N): write only planned shards I, I+N, ... (parallel tasks)
    dry_run: bool = False
    progress: bool = True
    source_options: dict = field(default_factory=dict)

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> ConvertOptions:
        """The parsed `xray-shard convert` flags. The chosen source's flags, and any other source's flag
        that was set, go to source_options: `source_namespace` refuses the latter (one check for both
        the CLI and library callers)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"source_options"}
        values = vars(args)
        mine = SOURCE_DESTS.get(values["source"], [])
        given = {
            dest: values[dest]
            for dest, default in SOURCE_DEFAULTS.items()
            if dest in values and (dest in mine or values[dest] != default)
        }
        return cls(**{k: v for k, v in values.items() if k in names}, source_options=given)

    def source_namespace(self) -> argparse.Namespace:
        """What the source adapter reads: its own options (defaults filled in) plus the common ones."""
        _ensure_source_options_known()
        mine = SOURCE_DESTS.get(self.source, [])
        unknown = sorted(set(self.source_options) - set(mine))
        if unknown:
            flags = ", ".join("--" + d.replace("_", "-") for d in unknown)
            raise ValueError(f"{flags} do(es) not apply to --source {self.source}")
        values = {dest: SOURCE_DEFAULTS.get(dest) for dest in mine}
        values.update(self.source_options)
        common = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source_options"
        }
        return argparse.Namespace(**common, **values)


def _csv_set(text: str, option: str) -> frozenset[str] | None:
    """'CR,DX' -> {'CR', 'DX'}; 'any' -> None (accept everything)."""
    values = frozenset(v.strip().upper() for v in text.split(",") if v.strip())
    if not values:
        raise ValueError(f"{option} is empty; give a comma-separated list or 'any'")
    return None if values == {"ANY"} else values


class _SharedOptions:
    """Lets several source adapters declare the same option (e.g. --labels-csv) once: the first wins."""

    def __init__(self, group, dests: list[str]):
        self._group, self._dests = group, dests

    def add_argument(self, *names, **kwargs):
        try:
            action = self._group.add_argument(*names, **kwargs)
        except argparse.ArgumentError:
            long_names = [n for n in names if n.startswith("--")] or list(names)
            self._dests.append(kwargs.get("dest") or long_names[0].lstrip("-").replace("-", "_"))
            return None
        self._dests.append(action.dest)
        SOURCE_DEFAULTS[action.dest] = action.default
        return action


SOURCE_DESTS: dict[str, list[str]] = {}  # source name -> dests of its options
SOURCE_DEFAULTS: dict[str, object] = {}  # dest -> default, to spot options of another source


def _ensure_source_options_known() -> None:
    """Fill SOURCE_DESTS / SOURCE_DEFAULTS once (a library caller never built the CLI parser)."""
    if not SOURCE_DESTS:
        _add_source_arguments(argparse.ArgumentParser(prog="xray-shard convert", add_help=False))


def _part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"--part wants I/N with 0 <= I < N (task I of N), got {text!r}")
    return int(index), int(count)


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    for name, module_name in SOURCES.items():
        try:
            module = get_source(name)
        except ModuleNotFoundError as error:
            if error.name != f"data_tools.sources.{module_name}":
                raise
            continue  # adapter not written yet: choosing it fails later with a clear message
        SOURCE_DESTS[name] = []
        if hasattr(module, "add_arguments"):
            group = parser.add_argument_group(f"--source {name}")
            module.add_arguments(_SharedOptions(group, SOURCE_DESTS[name]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", type=Path, required=True, help="archive folder (or the label table's folder)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder (new, empty, or a previous run to resume)"
    )
    parser.add_argument("--source", default="csv", help=f"input layout: {', '.join(SOURCES)} (default csv)")
    parser.add_argument("--dataset", help="dataset name, the shard name prefix (default: the source's)")
    out = parser.add_argument_group("output")
    out.add_argument("--format", dest="image_format", choices=IMAGE_FORMATS, default="png16")
    out.add_argument("--quality", type=int, help=f"JPEG quality for --format jpg (default {DEFAULT_QUALITY})")
    out.add_argument(
        "--long-side", type=int, default=1280, help="resize so the long side is N px (default 1280)"
    )
    out.add_argument("--upsample", action="store_true", help="also enlarge images smaller than --long-side")
    out.add_argument(
        "--intensity", choices=INTENSITY_POLICIES, default="percentile", help="see xray_core.images"
    )
    out.add_argument("--shard-size", type=int, help=f"samples per shard (default {DEFAULT_SHARD_SIZE})")
    out.add_argument("--shard-bytes", type=int, help="target bytes per shard (instead of --shard-size)")
    out.add_argument(
        "--salt", default=None, help="secret salt for patient/study hashes (default: a public one)"
    )
    out.add_argument("--keep-paths", action="store_true", help="store source paths and clear ids in the json")
    out.add_argument(
        "--dedup", action="store_true", help="skip images whose stored pixels equal an earlier one's"
    )
    filters = parser.add_argument_group("filters (DICOM headers)")
    filters.add_argument("--modalities", default="CR,DX", help="comma-separated, or 'any' (default CR,DX)")
    filters.add_argument(
        "--body-parts",
        default="CHEST,THORAX,ABSENT",
        help="BodyPartExamined values; ABSENT = tag missing; or 'any'",
    )
    filters.add_argument(
        "--allow-for-processing", action="store_true", help="keep DX 'FOR PROCESSING' images"
    )
    filters.add_argument("--views", default="any", help="e.g. PA,AP (default any)")
    filters.add_argument("--frames", choices=FRAME_POLICIES, default="first", help="multi-frame files")
    filters.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images larger than N pixels (rows x columns), before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--num-workers",
        "--workers",
        dest="num_workers",
        type=int,
        default=None,
        help="decode processes (default: all cores)",
    )
    run.add_argument(
        "--decode-timeout",
        type=float,
        default=DEFAULT_DECODE_TIMEOUT_S,
        help=f"skip a file whose conversion takes longer than S seconds (default {DEFAULT_DECODE_TIMEOUT_S:g})",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="report counts and projected bytes; write nothing"
    )
    run.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="progress bar (--no-progress hides it)",
    )
    run.add_argument(
        "--part",
        type=_part,
        metavar="I/N",
        help="write only planned shards I, I+N, I+2N, ... (task I of N in a parallel conversion, e.g. "
        "slurm/shard.sbatch); once all parts are done, the same command without --part writes the manifest",
    )
    _add_source_arguments(parser)


def _sample_options(args, label_names: list[str], salt: str) -> SampleOptions:
    """Validate the output options (ValueError on user errors) and bundle them for the workers."""
    if args.long_side < 16:
        raise ValueError(f"--long-side must be >= 16, got {args.long_side}")
    if args.quality is not None and (args.image_format != "jpg" or not 1 <= args.quality <= 100):
        raise ValueError(f"--quality {args.quality}: only for --format jpg, in 1..100")
    if args.num_workers is not None and args.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {args.num_workers}")
    if args.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    if not args.decode_timeout > 0:
        raise ValueError(f"--decode-timeout must be > 0 seconds, got {args.decode_timeout}")
    decode = DecodeOptions(
        intensity=args.intensity,
        modalities=_csv_set(args.modalities, "--modalities"),
        body_parts=_csv_set(args.body_parts, "--body-parts"),
        views=_csv_set(args.views, "--views"),
        allow_for_processing=args.allow_for_processing,
        frames=args.frames,
        max_pixels=args.max_pixels,
    )
    return SampleOptions(
        decode=decode,
        image_format=args.image_format,
        long_side=args.long_side,
        upsample=args.upsample,
        quality=DEFAULT_QUALITY if args.quality is None else args.quality,
        salt=salt,
        keep_paths=args.keep_paths,
        dedup=args.dedup,
        label_names=tuple(label_names),
    )


def _check_paths(args, dataset: str) -> None:
    if not Path(args.input).is_dir():
        raise ValueError(f"--input {args.input}: not a folder")
    if not dataset or not set(dataset) <= DATASET_CHARS:
        raise ValueError(f"dataset name {dataset!r}: use letters, digits, '_', '.', '-' (--dataset)")
    out, inp = Path(args.out).resolve(), Path(args.input).resolve()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {args.out}: {existing} is a file; give a folder")
    if not args.dry_run and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"--out {args.out}: {existing} is not writable (read-only file system or permissions)"
        )
    if args.source == "folder" and (out == inp or inp in out.parents):
        raise ValueError(f"--out {args.out} is inside --input {args.input}: outputs would become inputs")
    if out.is_dir() and any(out.iterdir()) and not (out / ".xray-shard").is_dir():
        raise ValueError(
            f"--out {args.out} exists, is not empty and is no xray-shard output; choose a new folder"
        )
    if args.shard_size is not None and args.shard_bytes is not None:
        raise ValueError("give --shard-size or --shard-bytes, not both")
    if (args.shard_size is not None and args.shard_size < 1) or (
        args.shard_bytes is not None and args.shard_bytes < 1
    ):
        raise ValueError("--shard-size / --shard-bytes must be >= 1")


def _list_inputs(source, args, dataset: str) -> tuple[list[Record], list[Skip]]:
    """Every input as a Record or a Skip, renamed to `dataset`."""
    records, skips = [], []
    for item in source.iter_records(Path(args.input), args):
        item.dataset = dataset
        (records if isinstance(item, Record) else skips).append(item)
    return records, skips


class OrderedPool:
    """`map` over worker processes, results in input order, at most a few tasks in flight per worker.

    workers <= 1 runs everything in this process. A worker that dies (a crash inside a native
    decoder) is replaced and the tasks that were in flight are rerun one at a time, so only the task
    that kills its worker again gets `crash_result(task)`; the run goes on.
    """

    def __init__(self, fn: Callable, workers: int, initializer=None, initargs=(), crash_result=None):
        self.fn, self.workers = fn, workers
        self.initializer, self.initargs = initializer, initargs
        self.crash_result = crash_result or (lambda task: None)
        self._executor: ProcessPoolExecutor | None = None
        self._initialized = False

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _restart(self) -> None:
        self.__exit__()
        # forkserver: workers do not inherit the caller's threads (torch, tqdm), unlike fork.
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        if method == "forkserver":  # applies when this process starts its forkserver
            context.set_forkserver_preload(["__main__", "data_tools.forkserver_preload"])
        self._executor = ProcessPoolExecutor(self.workers, context, self.initializer, self.initargs)

    def _isolate(self, tasks: list) -> list:
        self._restart()
        results = []
        for task in tasks:
            try:
                results.append(self._executor.submit(self.fn, task).result())
            except BrokenProcessPool:
                results.append(self.crash_result(task))
                self._restart()
        return results

    def _submit(self, task) -> Future:
        """Submit, or a future that holds BrokenProcessPool when a worker died since the last check:
        the crash is then handled in task order by `map`, like any other broken future."""
        try:
            return self._executor.submit(self.fn, task)
        except BrokenProcessPool as err:
            future: Future = Future()
            future.set_exception(err)
            return future

    def map(self, tasks: Iterable) -> Iterator:
        """Results of fn(task) in task order. Consume one map before starting the next."""
        if self.workers <= 1:
            if self.initializer and not self._initialized:
                self.initializer(*self.initargs)
                self._initialized = True
            yield from map(self.fn, tasks)
            return
        tasks = iter(tasks)
        if self._executor is None:
            self._restart()
        window: deque = deque()
        for task in islice(tasks, 2 * self.workers + 2):
            window.append((task, self._submit(task)))
        while window:
            task, future = window.popleft()
            try:
                results = [future.result()]
            except BrokenProcessPool:
                results = self._isolate([task] + [t for t, _ in window])
                window.clear()
            for _ in results:
                for task in islice(tasks, 1):
                    window.append((task, self._submit(task)))
            yield from results


def _fill_identities(records: list[Record], pool: OrderedPool, progress: bool) -> None:
    """Records with neither patient id nor split take PatientID / StudyInstanceUID from the header."""
    from tqdm import tqdm

    todo = [r for r in records if r.patient_id is None and r.split is None]
    results = pool.map(("identity", r.source_path) for r in todo)
    for record, found in tqdm(
        zip(todo, results), total=len(todo), desc="headers", unit="file", disable=not progress
    ):
        if found:
            record.patient_id, record.study_id = found[0], record.study_id or found[1]


def _assign(records: list[Record], skips: list[Skip]) -> dict[str, list[tuple[str, Record]]]:
    """(key, record) per split; a second record with an existing key becomes a Skip."""
    by_split: dict[str, list[tuple[str, Record]]] = {split: [] for split in SPLITS}
    seen: dict[str, str] = {}
    for record in records:
        key = sample_key(record.dataset, record.source_id)
        if key in seen:
            skips.append(
                Skip(
                    record.source_id,
                    f"duplicate input: same source_id as an earlier one (key {key})",
                    record.dataset,
                )
            )
            continue
        seen[key] = record.source_id
        split = record.split or split_for_patient(record.patient_id or record.source_id)
        if split not in SPLITS:
            raise ValueError(f"{record.source_id}: split {split!r} is not one of {SPLITS}")
        record.split = split
        by_split[split].append((key, record))
    return by_split


# --- worker side -------------------------------------------------------------------------------

_WORKER_OPTIONS: SampleOptions | None = None
_WORKER_TIMEOUT_S: float = DEFAULT_DECODE_TIMEOUT_S


class DecodeTimeout(BaseException):
    """Raised by the alarm inside a conversion; a BaseException so that decoders' `except Exception`
    blocks do not swallow it."""


def _init_worker(options: SampleOptions, timeout_s: float = DEFAULT_DECODE_TIMEOUT_S) -> None:
    global _WORKER_OPTIONS, _WORKER_TIMEOUT_S
    _WORKER_OPTIONS, _WORKER_TIMEOUT_S = options, timeout_s
    warnings.simplefilter("ignore")  # pydicom warns per odd element; problems are reported as skips
    if multiprocessing.parent_process() is not None:  # a pool worker, not the main process
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to report
        die_with_parent()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (a worker: the forkserver; the
    forkserver: the converter, see forkserver_preload), so that a SIGKILLed converter leaves no process
    behind. Linux only; elsewhere this does nothing."""
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os._exit(1)  # the parent died before the request took effect


@contextmanager
def _time_limit(seconds: float):
    """Raise DecodeTimeout in this (main) thread after `seconds`; in a pool worker also exit the
    process HARD_TIMEOUT_GRACE_S later, for code that never returns to Python. An outer timer that is
    due earlier (e.g. pytest-timeout's) is left alone; one due later is re-armed afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous_delay, previous_interval = signal.getitimer(signal.ITIMER_REAL)
    if previous_delay and previous_delay <= seconds:
        yield
        return

    def on_alarm(signum, frame):
        raise DecodeTimeout

    hard = None
    if multiprocessing.parent_process() is not None:
        hard = threading.Timer(seconds + HARD_TIMEOUT_GRACE_S, os._exit, (70,))
        hard.daemon = True
        hard.start()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    started = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if hard is not None:
            hard.cancel()
        if previous_delay:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)


def _task(task: tuple):
    """Worker entry point. ("sample", key, split, record) -> Sample, or the skip reason (str);
    ("identity", path) -> (PatientID, StudyInstanceUID) or None. Never raises for a bad input."""
    from data_tools.encode import build_sample
    from xray_core.dicom import read_identity
    from xray_core.images import SkipInput

    if task[0] == "identity":
        try:
            return read_identity(task[1])
        except Exception:  # a broken header is reported when the file is decoded, not here
            return None
    _, key, split, record = task
    try:
        with _time_limit(_WORKER_TIMEOUT_S):
            return build_sample(record, key, split, _WORKER_OPTIONS)
    except DecodeTimeout:
        return f"decode timeout: conversion took over {_WORKER_TIMEOUT_S:g} s (--decode-timeout)"
    except SkipInput as reason:
        return str(reason)
    except MemoryError:
        return "out of memory while converting this file (lower --max-pixels or --workers)"
    except Exception as error:  # any decoder bug on one file must not stop a million-file run
        return f"conversion error: {type(error).__name__}: {error}"[:1000]


def _crash_result(task: tuple) -> str | None:
    if task[0] == "identity":
        return None
    return (
        "worker process died while converting this file (a crash in a native decoder, or stuck in one "
        "past --decode-timeout)"
    )


# --- main side ---------------------------------------------------------------------------------


def _settings_dict(args, options: SampleOptions, shard_size: int) -> dict:
    """Output-affecting options for the manifest (deterministic, no secrets, no input paths)."""
    keep = set(SOURCE_DESTS.get(args.source, []))
    source_options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k in keep}
    settings = {
        "image_format": options.image_format,
        "long_side": options.long_side,
        "upsample": options.upsample,
        "intensity": options.decode.intensity,
        "modalities": args.modalities,
        "body_parts": args.body_parts,
        "views": args.views,
        "allow_for_processing": options.decode.allow_for_processing,
        "frames": options.decode.frames,
        "shard_size": shard_size,
        "shard_bytes": args.shard_bytes,
        "keep_paths": options.keep_paths,
        "dedup": options.dedup,
        "source_options": source_options,
    }
    if options.image_format == "jpg":
        settings["quality"] = options.quality
    if options.image_format == "png16":
        settings["png_level"], settings["png_strategy"] = PNG_LEVEL, "huffman_only"
    return settings


def _probe(by_split, pool: OrderedPool) -> tuple[list[Sample], list[str]]:
    """Encode a deterministic sample of records (evenly spaced in key order) in memory."""
    items = [
        ("sample", key, split, rec)
        for split in SPLITS
        for key, rec in sorted(by_split[split], key=lambda kr: kr[0])
    ]
    if not items:
        return [], []
    step = max(1, len(items) // SHARD_BYTES_SAMPLE)
    chosen = items[::step][:SHARD_BYTES_SAMPLE]
    samples, reasons = [], []
    for result in pool.map(chosen):
        (reasons if isinstance(result, str) else samples).append(result)
    return samples, reasons


def _shard_size(args, probe: tuple[list[Sample], list[str]] | None) -> int:
    """Samples per shard: --shard-size, or --shard-bytes divided by the probed mean sample size."""
    if args.shard_bytes is None:
        return args.shard_size or DEFAULT_SHARD_SIZE
    samples, reasons = probe
    if not samples:
        raise ValueError(
            f"--shard-bytes: could not estimate the sample size ({len(reasons)} probed inputs were all "
            "skipped); use --shard-size"
        )
    mean_bytes = sum(_tar_bytes(s) for s in samples) / len(samples)
    return max(1, int(args.shard_bytes // mean_bytes))


def _tar_bytes(sample: Sample) -> int:
    """Bytes a sample takes in a tar: a 512-byte header per member, data padded to 512 bytes."""
    return sum(512 + -(-len(data) // 512) * 512 for data in sample.components.values())


def _fingerprint(settings: dict, dataset: str, source: str, label_names, salt: str, plan) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps([TOOL_VERSION, settings, dataset, source, label_names, salt_fingerprint(salt)]).encode()
    )
    for shard in plan:
        digest.update(shard.name.encode())
        digest.update("".join(key for key, _ in shard.items).encode())
    return digest.hexdigest()[:16]


class _Dedup:
    """First occurrence (in plan order) of each pixel hash wins; later ones are duplicates."""

    def __init__(self, plan):
        self.position = {key: i for i, key in enumerate(k for shard in plan for k, _ in shard.items)}
        self.first: dict[str, str] = {}

    def note(self, pixel_hash: str, key: str) -> str | None:
        """Record this sample; return the key it duplicates, if any."""
        earlier = self.first.get(pixel_hash)
        if earlier is not None and self.position[earlier] < self.position[key]:
            return earlier
        self.first[pixel_hash] = key
        return None


def _write_shards(
    out_dir, pending, store, label_names, pool: OrderedPool, progress, dedup
) -> list[ShardState]:
    """Decode the pending shards' records in key order on the pool and write each shard."""
    from tqdm import tqdm

    tasks = (("sample", key, shard.split, record) for shard in pending for key, record in shard.items)
    total = sum(len(shard.items) for shard in pending)
    states = []
    with tqdm(total=total, desc="convert", unit="img", disable=not progress, smoothing=0.05) as bar:
        results = pool.map(tasks)
        for shard in pending:
            builder = ShardBuilder(out_dir, shard, label_names)
            write_seconds = 0.0
            try:
                for (key, record), result in zip(shard.items, results):
                    started = time.process_time()
                    is_sample = not isinstance(result, str)
                    duplicate = dedup.note(result.pixel_hash, key) if dedup and is_sample else None
                    if is_sample and not duplicate:
                        builder.add_sample(result)
                    else:
                        builder.add_skip(
                            record.source_id,
                            record.dataset,
                            result if not is_sample else f"duplicate of {duplicate}",
                        )
                    write_seconds += time.process_time() - started
                    bar.update(1)
                builder.state.cpu_seconds["write"] = write_seconds
                states.append(builder.finish(store))  # adds its own time to "write"
            except BaseException:
                builder.abort()
                raise
    return states


def _dry_run_report(by_split, skips, num_inputs, shard_size, probe: tuple[list[Sample], list[str]]) -> dict:
    samples, reasons = probe
    num_records = sum(len(v) for v in by_split.values())
    probed = len(samples) + len(reasons)
    mean_bytes = sum(_tar_bytes(s) for s in samples) / len(samples) if samples else 0.0
    ok_fraction = len(samples) / probed if probed else 0.0
    return {
        "dry_run": True,
        "num_inputs": num_inputs,
        "num_records": num_records,
        "num_skipped_by_source": len(skips),
        "source_skip_examples": [f"{s.source_id}: {s.reason}" for s in skips[:5]],
        "splits": {split: len(by_split[split]) for split in SPLITS},
        "num_shards_planned": sum(-(-len(v) // shard_size) for v in by_split.values()),
        "probe": {"num_probed": probed, "num_ok": len(samples), "skip_reasons": reasons},
        "mean_sample_bytes": round(mean_bytes),
        "projected_num_samples": round(num_records * ok_fraction),
        "projected_bytes": round(num_records * ok_fraction * mean_bytes),
    }


def convert_folder(options: ConvertOptions) -> dict:
    """Run one conversion; returns the manifest (or the dry-run report)."""
    source = get_source(options.source)
    args = options.source_namespace()  # the adapters read their options from a namespace
    dataset = args.dataset or source.DATASET
    _check_paths(args, dataset)
    if args.part and args.dedup:
        raise ValueError("--dedup compares every shard with the earlier ones: it cannot run in --part tasks")
    salt = args.salt if args.salt is not None else DEFAULT_SALT
    if args.salt is None and not args.dry_run:
        warnings.warn(
            "xray-shard convert: using the public default salt; patient/study hashes can be reversed by "
            "anyone who can guess the ids. Pass --salt SECRET for real data.",
            stacklevel=2,
        )
    label_names = list(source.label_names(Path(args.input), args))
    options = _sample_options(args, label_names, salt)
    records, skips = _list_inputs(source, args, dataset)
    if not records and not skips:
        raise ValueError(f"--input {args.input}: no input files found for --source {args.source}")
    workers = max(1, args.num_workers or os.cpu_count() or 1)
    initargs = (options, args.decode_timeout)
    with OrderedPool(_task, workers, _init_worker, initargs, _crash_result) as pool:
        _fill_identities(records, pool, args.progress)
        num_inputs = len(records) + len(skips)
        by_split = _assign(records, skips)
        # One probe serves both --shard-bytes and the dry-run report (it decodes and encodes files).
        probe = _probe(by_split, pool) if args.shard_bytes is not None or args.dry_run else None
        shard_size = _shard_size(args, probe)
        if args.dry_run:
            return _dry_run_report(by_split, skips, num_inputs, shard_size, probe)
        plan = plan_shards(by_split, dataset, shard_size)
        settings = _settings_dict(args, options, shard_size)
        states = _write_missing_shards(args, plan, settings, dataset, label_names, salt, options.dedup, pool)
    if args.part:  # the manifest needs every part: the run without --part writes it
        return {"part": list(args.part), "shards": [state.name for state in states]}
    skipped = [{"source_id": s.source_id, "dataset": s.dataset, "reason": s.reason} for s in skips]
    skipped += [line for state in states for line in state.skipped]
    manifest = build_manifest(
        dataset, args.source, settings, label_names, salt_fingerprint(salt), states, num_inputs, len(skipped)
    )
    assert manifest["num_samples"] + len(skipped) == num_inputs, (
        manifest["num_samples"],
        len(skipped),
        num_inputs,
    )
    out_dir = Path(args.out)
    write_skipped(out_dir, skipped)
    if not manifest["num_samples"]:  # a manifest of no pixels would hold intensity std 0
        raise ValueError(
            f"none of the {num_inputs} inputs became a sample; the reasons are in {out_dir / 'skipped.jsonl'}"
        )
    write_id_map(out_dir, [tuple(row) for state in states for row in state.id_rows])
    write_manifest(out_dir, manifest)
    index_folder(out_dir, workers)  # the loaders' compact index (a cache: rebuilt if idx files change)
    return manifest


def _write_missing_shards(
    args, plan, settings, dataset, label_names, salt, dedup: bool, pool
) -> list[ShardState]:
    """Load the states of shards already complete, write the others; all states in plan order (only
    this task's shards with --part)."""
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = plan[args.part[0] :: args.part[1]] if args.part else plan
    store = StateStore(out_dir)
    store.begin(
        _fingerprint(settings, dataset, args.source, label_names, salt, plan),
        [shard.name for shard in mine] if args.part else None,
    )
    done = {shard.name: store.load_complete(shard) for shard in mine}
    pending = [shard for shard in mine if done[shard.name] is None]
    deduper = _Dedup(plan) if dedup else None
    for state in filter(None, done.values()):
        for pixel_hash, key in state.pixel_hashes if deduper else []:
            deduper.note(pixel_hash, key)
    written = _write_shards(out_dir, pending, store, label_names, pool, args.progress, deduper)
    states = {state.name: state for state in [*filter(None, done.values()), *written]}
    return [states[shard.name] for shard in mine]


def convert(input_dir: Path, out_dir: Path, **options) -> dict:
    """Library entry point of `xray-shard convert`; returns the manifest (a dict).

    `options` are `ConvertOptions` fields (e.g. image_format="jpg", long_side=512, num_workers=2,
    progress=False, dry_run=True) or options of the chosen source by their argparse names (e.g.
    labels_csv="labels.csv" for source="csv").
    """
    names = {f.name for f in dataclasses.fields(ConvertOptions)} - {"input", "out", "source_options"}
    _ensure_source_options_known()
    known_source = {dest for dests in SOURCE_DESTS.values() for dest in dests}
    unknown = sorted(set(options) - names - known_source)
    if unknown:
        raise ValueError(f"unknown convert option(s) {unknown}; known: {sorted(names | known_source)}")
    common = {k: v for k, v in options.items() if k in names}
    specific = {k: v for k, v in options.items() if k not in names}
    return convert_folder(ConvertOptions(Path(input_dir), Path(out_dir), **common, source_options=specific))


def _summary(result: dict) -> str:
    if result.get("dry_run"):
        return json.dumps(result, indent=1)
    if "part" in result:
        index, count = result["part"]
        return f"part {index}/{count}: {len(result['shards'])} shards complete; manifest not written (run without --part)"
    splits = ", ".join(f"{k} {v}" for k, v in result["splits"].items())
    num_bytes = sum(s["num_bytes"] for s in result["shards"])
    return (
        f"{result['num_samples']} samples ({splits}), {result['num_skipped']} skipped of "
        f"{result['num_inputs']} inputs; {len(result['shards'])} shards, {num_bytes / 1e6:.1f} MB"
    )


# xray_core.cli adds this to an interruption or a file-system error of `xray-shard convert`.
FAILURE_HINT = "finished shards are kept: run the same command again to resume"


def run(args: argparse.Namespace) -> int:
    print(_summary(convert_folder(ConvertOptions.from_namespace(args))))
    return 0
