"""Report items: what the loaders order and read when a task asks for report text.

Reports belong to studies, samples to images. For a report task the unit the loaders order, shard
over ranks, resume and pad is the *report item* (`report.studies.group_studies`): one image with a
report (``views=1``) or a study's frontal + lateral pair (``views=2``). An :class:`ItemTable` holds
the items of one split as one `SplitTable` per view slot (frontal, lateral), aligned row for row,
plus the item texts in a :class:`TextColumn`; `order.py` then runs over item rows exactly as it runs
over samples otherwise. Without a report task the loaders use ``ItemTable([table])`` and nothing
here reads a json.

Cost: grouping reads every sample's json of the split once (a pread of a few hundred bytes and a
``json.loads``), holds a small dict per sample of one folder while grouping it, and keeps afterwards
only numpy rows and one text buffer per folder. Measured (6000 samples with ~430-character
findings, page cache warm, one core of this shared 2-core machine): ~70 us per sample, peak ~1.8 KB
per sample while grouping, ~0.5 KB per sample kept (mostly the text). IU X-ray (7.5k images): ~0.5 s;
MIMIC-CXR (377k): ~26 s, ~0.7 GB transient, ~0.2 GB kept, in every rank, once per split and run.
A split's grouping is cached per table, so the task's tokenizer pass (`train_report_texts`) and the
train loader share it.
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from xray_pretrain.data.shards import ShardReader, SplitTable
from xray_pretrain.report.studies import SECTIONS, StudyGrouping, group_studies

log = logging.getLogger(__name__)

COUNT_NAMES = (
    "num_images",
    "num_no_report",
    "num_missing_view",
    "num_extra_images",
    "num_pairs_with_unknown_views",
    "num_report_conflicts",
)


@dataclass(frozen=True)
class ReportSpec:
    """What a report task asks of the loaders: which report section, one image or a view pair."""

    section: str = "findings"
    views: int = 1

    def validate(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"report.section={self.section!r}: use one of {SECTIONS}")
        if self.views not in (1, 2):
            raise ValueError(f"report.views={self.views}: use 1 (one image) or 2 (frontal + lateral)")


class TextColumn:
    """Strings kept as one UTF-8 buffer and int64 offsets: no Python object per string while stored
    (MIMIC-CXR's 377k reports are one bytes object, shared by forked loader workers)."""

    def __init__(self, texts: Iterable[str]):
        encoded = [text.encode() for text in texts]
        self.offsets = np.cumsum([0, *map(len, encoded)], dtype=np.int64)
        self.buffer = b"".join(encoded)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> str:
        return self.buffer[self.offsets[index] : self.offsets[index + 1]].decode()


@dataclass
class ItemTable:
    """The rows the loaders order: item i of folder f reads sample i of ``views[v]``'s folder f for
    each view slot v (frontal first), and has text ``texts[f][i]`` (None: no report task)."""

    views: list[SplitTable]
    texts: list[TextColumn] | None = None
    counts: dict[str, int] = field(default_factory=dict)  # images left out and why (`COUNT_NAMES`)

    @property
    def table(self) -> SplitTable:
        """The first view's table: folders, label names and intensity statistics of every view."""
        return self.views[0]

    @property
    def num_views(self) -> int:
        return len(self.views)

    @property
    def folder_sizes(self) -> list[int]:
        return self.table.folder_sizes

    def key(self, folder: int, index: int) -> str:
        """The item's key: its (frontal) image's key."""
        return self.table.key(folder, index)

    def text(self, folder: int, index: int) -> str | None:
        return None if self.texts is None else self.texts[folder][index]


_GROUPED: weakref.WeakKeyDictionary[SplitTable, dict[ReportSpec, ItemTable]] = weakref.WeakKeyDictionary()


def report_items(table: SplitTable, spec: ReportSpec, progress: bool = True) -> ItemTable:
    """The report items of `table` (cached per table and spec): every image with report text in
    `spec.section` (views=1), or every study's frontal + lateral pair (views=2), grouped within each
    shard folder by the study id the shards hold. Items of a folder are in table order (of their
    first image). Images left out are counted, logged once, and kept in `ItemTable.counts`."""
    spec.validate()
    cached = _GROUPED.setdefault(table, {})
    if spec not in cached:
        cached[spec] = _group(table, spec, progress)
    return cached[spec]


def _group(table: SplitTable, spec: ReportSpec, progress: bool) -> ItemTable:
    rows, texts, counts = [], [], dict.fromkeys(COUNT_NAMES, 0)
    reader = ShardReader()
    bar = tqdm(
        total=sum(table.folder_sizes), desc=f"{table.split} reports", unit="json", disable=not progress
    )
    try:
        for folder, size in enumerate(table.folder_sizes):
            grouping, index_of = _folder_grouping(table, reader, folder, size, spec, bar)
            # (items, views) sample indices, items in table order of their first image
            folder_rows = np.array(
                [[index_of[k] for k in item.keys] for item in grouping.items], dtype=np.int64
            ).reshape(-1, spec.views)
            order = np.argsort(folder_rows[:, 0], kind="stable")
            rows.append(folder_rows[order])
            texts.append(TextColumn(grouping.items[i].report for i in order))
            for name in COUNT_NAMES:
                counts[name] += getattr(grouping, name)
    finally:
        reader.close()
        bar.close()
    num_items = sum(len(r) for r in rows)
    views = [table.subset([r[:, v] for r in rows]) for v in range(spec.views)]
    log.info(
        "%s report items (report.views=%d, report.section=%s): %d items from %d images; left out: "
        "%d images without report text, %d without a frontal+lateral pair, %d extra views of paired "
        "studies; %d pairs used images without a view, %d studies with conflicting reports",
        table.split, spec.views, spec.section, num_items, counts["num_images"], counts["num_no_report"],
        counts["num_missing_view"], counts["num_extra_images"], counts["num_pairs_with_unknown_views"],
        counts["num_report_conflicts"],
    )  # fmt: skip
    return ItemTable(views, texts, {"num_items": num_items, **counts})


def _folder_grouping(
    table: SplitTable, reader: ShardReader, folder: int, size: int, spec: ReportSpec, bar
) -> tuple[StudyGrouping, dict[str, int]]:
    """group_studies over one folder's sample jsons, and key -> sample index in the folder."""
    samples, index_of = [], {}
    for index in range(size):
        meta = table.metadata(reader, folder, index)
        key = table.key(folder, index)
        index_of[key] = index
        samples.append(
            {  # only what grouping reads: a ~1 KB dict per sample while this folder is grouped
                "key": key,
                "dataset": sys.intern(str(meta.get("dataset") or table.folders[folder].dataset)),
                "study": meta.get("study"),
                "view": meta.get("view"),
                "view_order": meta.get("view_order"),  # IU X-ray: the place in R2Gen's image_path
                "report": meta.get("report"),
            }
        )
        bar.update()
    return group_studies(samples, spec.views, spec.section), index_of


def train_report_texts(table: SplitTable, section: str, views: int) -> list[str]:
    """One report text per training item of `table` (report items as the loaders read them, in the
    loaders' table order), for building the tokenizer. Shares its grouping with the train loader."""
    items = report_items(table, ReportSpec(section, views))
    return [items.texts[f][i] for f in range(len(items.texts)) for i in range(len(items.texts[f]))]
