"""Source adapters: one small module per dataset layout, selected by `xray-shard convert --source`.

Each adapter module defines

    DATASET: str                                   # default dataset name (shard name prefix)
    def add_arguments(parser) -> None              # optional: adapter-specific CLI options
    def label_names(input_dir: Path, args) -> list[str]
    def iter_records(input_dir: Path, args) -> Iterator[Record | Skip]

and must yield exactly one Record or Skip per input file it sees (see `data_tools.records`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# --source name -> module under data_tools.sources
SOURCES = {
    "folder": "folder",
    "csv": "csv_table",
    "nih-cxr14": "nih_cxr14",
    "chexpert": "chexpert",
    "mimic-cxr-jpg": "mimic_cxr_jpg",
    "mimic-cxr": "mimic_cxr",
    "padchest": "padchest",
    "vindr-cxr": "vindr_cxr",
    "rsna-pneumonia": "rsna_pneumonia",
    "iu-xray": "iu_xray",
    "covid-cxr": "covid_cxr",
}


def get_source(name: str) -> ModuleType:
    if name not in SOURCES:
        raise ValueError(f"unknown --source {name!r}; choose one of: {', '.join(SOURCES)}")
    return importlib.import_module(f"data_tools.sources.{SOURCES[name]}")
