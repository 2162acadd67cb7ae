"""One label vocabulary for every dataset, and the table that maps each dataset's labels into it.

`LABEL_NAMES` fixes the order of `labels.npy` for the source adapters (the manifest repeats it). A
label value is 1.0 (present), 0.0 (absent), -1.0 (uncertain) or None (unknown: the dataset does not
annotate it). Each dataset has one mapping dict, source label -> tuple of LABEL_NAMES; a source label
may feed several names (NIH "Nodule" feeds both `nodule` and the union `nodule_mass`), and several
source labels may feed one name. `docs/labels.md` is generated from this module
(`python -m data_tools.labels > docs/labels.md`) and a test keeps the two identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Grouped by where a label first appears: CheXpert's 14, then what NIH, VinDr-CXR (22 local + 6
# global labels) and the COVID collection add. The phantom generator's five names are all here.
LABEL_NAMES: tuple[str, ...] = (
    # CheXpert / MIMIC-CXR (14)
    "no_finding",
    "enlarged_cardiomediastinum",
    "cardiomegaly",
    "lung_opacity",
    "lung_lesion",
    "edema",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "pneumothorax",
    "pleural_effusion",
    "pleural_other",
    "fracture",
    "support_devices",
    # ChestX-ray14 (NIH) adds
    "infiltration",
    "mass",
    "nodule",
    "emphysema",
    "fibrosis",
    "pleural_thickening",
    "hernia",
    # VinDr-CXR local labels add
    "aortic_enlargement",
    "calcification",
    "clavicle_fracture",
    "enlarged_pa",
    "ild",
    "lung_cavity",
    "lung_cyst",
    "mediastinal_shift",
    "nodule_mass",
    "rib_fracture",
    "other_lesion",
    # VinDr-CXR global labels add
    "copd",
    "lung_tumor",
    "tuberculosis",
    "other_diseases",
    # covid-chestxray-dataset adds
    "covid_19",
    "viral_pneumonia",
    "bacterial_pneumonia",
    "fungal_pneumonia",
    "ards",
)

LabelMap = dict[str, tuple[str, ...]]

# CheXpert labeler columns: CheXpert train.csv/valid.csv and MIMIC-CXR-JPG chexpert.csv / negbio.csv.
CHEXPERT: LabelMap = {
    "No Finding": ("no_finding",),
    "Enlarged Cardiomediastinum": ("enlarged_cardiomediastinum",),
    "Cardiomegaly": ("cardiomegaly",),
    "Lung Opacity": ("lung_opacity",),
    "Lung Lesion": ("lung_lesion",),
    "Edema": ("edema",),
    "Consolidation": ("consolidation",),
    "Pneumonia": ("pneumonia",),
    "Atelectasis": ("atelectasis",),
    "Pneumothorax": ("pneumothorax",),
    "Pleural Effusion": ("pleural_effusion",),
    "Pleural Other": ("pleural_other",),
    "Fracture": ("fracture",),
    "Support Devices": ("support_devices",),
}

# ChestX-ray14 `Finding Labels` (pipe-separated).
NIH_CXR14: LabelMap = {
    "No Finding": ("no_finding",),
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly",),
    "Effusion": ("pleural_effusion",),
    "Infiltration": ("infiltration",),
    "Mass": ("mass", "nodule_mass"),
    "Nodule": ("nodule", "nodule_mass"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Edema": ("edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("fibrosis",),
    "Pleural_Thickening": ("pleural_thickening",),
    "Hernia": ("hernia",),
}

# VinDr-CXR: PhysioNet image_labels_*.csv columns (22 local + 6 global) and the Kaggle VinBigData
# `class_name` values (14 local + "No finding"). The train file says "Other diseases", the test file
# "Other disease".
VINDR_CXR: LabelMap = {
    "Aortic enlargement": ("aortic_enlargement",),
    "Atelectasis": ("atelectasis",),
    "Calcification": ("calcification",),
    "Cardiomegaly": ("cardiomegaly",),
    "Clavicle fracture": ("clavicle_fracture",),
    "Consolidation": ("consolidation",),
    "Edema": ("edema",),
    "Emphysema": ("emphysema",),
    "Enlarged PA": ("enlarged_pa",),
    "ILD": ("ild",),
    "Infiltration": ("infiltration",),
    "Lung Opacity": ("lung_opacity",),
    "Lung cavity": ("lung_cavity",),
    "Lung cyst": ("lung_cyst",),
    "Mediastinal shift": ("mediastinal_shift",),
    "Nodule/Mass": ("nodule_mass",),
    "Pleural effusion": ("pleural_effusion",),
    "Pleural thickening": ("pleural_thickening",),
    "Pneumothorax": ("pneumothorax",),
    "Pulmonary fibrosis": ("fibrosis",),
    "Rib fracture": ("rib_fracture",),
    "Other lesion": ("other_lesion",),
    "COPD": ("copd",),
    "Lung tumor": ("lung_tumor",),
    "Pneumonia": ("pneumonia",),
    "Tuberculosis": ("tuberculosis",),
    "Other diseases": ("other_diseases",),
    "Other disease": ("other_diseases",),
    "No finding": ("no_finding",),
}

# The 15 classes of the Kaggle VinBigData train.csv: the only VinDr labels that layout annotates.
VINDR_KAGGLE_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "No finding",
)

# RSNA Pneumonia: `Target` 1 is an opacity suggestive of pneumonia; stage_2_detailed_class_info.csv
# `class` adds whether a Target-0 image is normal.
RSNA_PNEUMONIA: LabelMap = {
    "Lung Opacity": ("lung_opacity", "pneumonia"),
    "Normal": ("no_finding",),
    "No Lung Opacity / Not Normal": (),
}

# covid-chestxray-dataset `finding`: old releases say "COVID-19" or "SARS", new ones say
# "Pneumonia/Viral/COVID-19"; the value is split on "/" and "," and each lower-case part is mapped.
COVID_CXR: LabelMap = {
    "no finding": ("no_finding",),
    "pneumonia": ("pneumonia",),
    "viral": ("viral_pneumonia", "pneumonia"),
    "bacterial": ("bacterial_pneumonia", "pneumonia"),
    "fungal": ("fungal_pneumonia", "pneumonia"),
    "covid-19": ("covid_19", "viral_pneumonia", "pneumonia"),
    "sars": ("viral_pneumonia", "pneumonia"),
    "mers-cov": ("viral_pneumonia", "pneumonia"),
    "mers": ("viral_pneumonia", "pneumonia"),
    "influenza": ("viral_pneumonia", "pneumonia"),
    "varicella": ("viral_pneumonia", "pneumonia"),
    "herpes": ("viral_pneumonia", "pneumonia"),
    "streptococcus": ("bacterial_pneumonia", "pneumonia"),
    "staphylococcus": ("bacterial_pneumonia", "pneumonia"),
    "klebsiella": ("bacterial_pneumonia", "pneumonia"),
    "legionella": ("bacterial_pneumonia", "pneumonia"),
    "chlamydophila": ("bacterial_pneumonia", "pneumonia"),
    "e.coli": ("bacterial_pneumonia", "pneumonia"),
    "mycoplasma": ("bacterial_pneumonia", "pneumonia"),
    "nocardia": ("bacterial_pneumonia", "pneumonia"),
    "pneumocystis": ("fungal_pneumonia", "pneumonia"),
    "aspergillosis": ("fungal_pneumonia", "pneumonia"),
    "tuberculosis": ("tuberculosis",),
    "ards": ("ards",),
}

# PadChest `Labels` (lower-case report-derived findings, stripped). Only the findings that have a
# name in LABEL_NAMES are listed; PadChest's other ~150 findings are ignored.
PADCHEST: LabelMap = {
    "normal": ("no_finding",),
    "cardiomegaly": ("cardiomegaly",),
    "pleural effusion": ("pleural_effusion",),
    "loculated pleural effusion": ("pleural_effusion",),
    "nodule": ("nodule", "nodule_mass"),
    "multiple nodules": ("nodule", "nodule_mass"),
    "mass": ("mass", "nodule_mass"),
    "pulmonary mass": ("mass", "nodule_mass"),
    "pneumothorax": ("pneumothorax",),
    "hydropneumothorax": ("pneumothorax", "pleural_effusion"),
    "consolidation": ("consolidation",),
    "air bronchogram": ("consolidation",),
    "atelectasis": ("atelectasis",),
    "lobar atelectasis": ("atelectasis",),
    "segmental atelectasis": ("atelectasis",),
    "laminar atelectasis": ("atelectasis",),
    "round atelectasis": ("atelectasis",),
    "total atelectasis": ("atelectasis",),
    "pneumonia": ("pneumonia",),
    "atypical pneumonia": ("pneumonia",),
    "infiltrates": ("infiltration",),
    "pulmonary edema": ("edema",),
    "emphysema": ("emphysema",),
    "pulmonary fibrosis": ("fibrosis",),
    "pleural thickening": ("pleural_thickening",),
    "apical pleural thickening": ("pleural_thickening",),
    "hiatal hernia": ("hernia",),
    "interstitial pattern": ("ild",),
    "reticular interstitial pattern": ("ild",),
    "reticulonodular interstitial pattern": ("ild",),
    "calcified granuloma": ("calcification",),
    "cavitation": ("lung_cavity",),
    "mediastinal shift": ("mediastinal_shift",),
    "pulmonary artery enlargement": ("enlarged_pa",),
    "rib fracture": ("rib_fracture", "fracture"),
    "callus rib fracture": ("rib_fracture", "fracture"),
    "clavicle fracture": ("clavicle_fracture", "fracture"),
    "vertebral fracture": ("fracture",),
    "humeral fracture": ("fracture",),
    "copd signs": ("copd",),
    "tuberculosis": ("tuberculosis",),
    "lung metastasis": ("lung_tumor",),
    "pacemaker": ("support_devices",),
    "dual chamber device": ("support_devices",),
    "single chamber device": ("support_devices",),
    "electrical device": ("support_devices",),
    "nsg tube": ("support_devices",),
    "endotracheal tube": ("support_devices",),
    "tracheostomy tube": ("support_devices",),
    "chest drain tube": ("support_devices",),
    "central venous catheter": ("support_devices",),
    "central venous catheter via jugular vein": ("support_devices",),
    "central venous catheter via subclavian vein": ("support_devices",),
}

# Dataset name (the --source name) -> its mapping, in the order docs/labels.md shows them.
DATASET_LABEL_MAPS: dict[str, LabelMap] = {
    "chexpert": CHEXPERT,
    "mimic-cxr-jpg": CHEXPERT,
    "mimic-cxr": CHEXPERT,
    "nih-cxr14": NIH_CXR14,
    "vindr-cxr": VINDR_CXR,
    "rsna-pneumonia": RSNA_PNEUMONIA,
    "covid-cxr": COVID_CXR,
    "padchest": PADCHEST,
    "iu-xray": {},
}

# How each dataset's values are read, shown above its table in docs/labels.md.
DATASET_NOTES: dict[str, str] = {
    "chexpert": "Columns of train.csv / valid.csv: 1.0 -> 1, 0.0 -> 0, -1.0 -> -1 (uncertain, kept), "
    "blank -> unknown. Names not in the table are unknown.",
    "mimic-cxr-jpg": "Per study, from mimic-cxr-2.0.0-chexpert.csv (default) or -negbio.csv "
    "(`--mimic-labels negbio`), read like CheXpert; a study missing from that file is unknown.",
    "mimic-cxr": "As mimic-cxr-jpg, when the MIMIC-CXR-JPG CSVs are given with `--mimic-csv-dir`; "
    "otherwise every label is unknown.",
    "nih-cxr14": "`Finding Labels` split on `|`: listed -> 1; every other name of this table -> 0; "
    "names not in the table are unknown.",
    "vindr-cxr": "PhysioNet image_labels_*.csv: one row per radiologist; a label is 1 when most of the "
    "image's radiologists marked it, -1 when some but not most did, 0 when none did. Kaggle "
    "VinBigData train.csv: a radiologist marks a class by having a box row (or a `No finding` row) "
    "for it, the same vote applies, and only its 15 classes are known.",
    "rsna-pneumonia": "`Target` 1 -> `Lung Opacity`, 0 -> absent; stage_2_detailed_class_info.csv, "
    "when present, adds `Normal` vs `No Lung Opacity / Not Normal` (which maps to nothing, so it only "
    "makes `no_finding` 0). Without it `no_finding` is unknown.",
    "covid-cxr": "`finding` split on `/` and `,`, each part lower-cased: parts in the table -> 1, every "
    "other name of this table -> 0 (the column holds the image's whole diagnosis). A part not in "
    "the table makes all of this table's names unknown for that image.",
    "padchest": "`Labels` (a Python-style list of lower-case findings, stripped): listed -> 1; every "
    "other name of this table -> 0; findings not in the table are ignored; a missing or unparsable "
    "`Labels` makes everything unknown.",
    "iu-xray": "The R2Gen annotation has reports and no labels: every label is unknown.",
}


def check_label_map(mapping: LabelMap) -> None:
    """Raise ValueError if a mapping targets a name that is not in LABEL_NAMES."""
    known = set(LABEL_NAMES)
    for source, targets in mapping.items():
        unknown = [t for t in targets if t not in known]
        if unknown:
            raise ValueError(f"label map entry {source!r} targets {unknown}, not in LABEL_NAMES")


def unknown_labels() -> dict[str, float | None]:
    """A full label dict with every name unknown (None)."""
    return dict.fromkeys(LABEL_NAMES)


def _stronger(a: float | None, b: float | None) -> float | None:
    """Combine two values for one name: present beats uncertain beats absent beats unknown."""
    rank = {None: 0, 0.0: 1, -1.0: 2, 1.0: 3}
    return a if rank[a] >= rank[b] else b


def map_values(mapping: LabelMap, values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Column-style labels: `values` maps source label -> 1/0/-1/None; returns a full LABEL_NAMES dict.

    Source labels missing from `mapping` are ignored; names no source feeds stay None.
    """
    labels = unknown_labels()
    for source, value in values.items():
        if value not in (None, 0.0, 1.0, -1.0):
            raise ValueError(f"label {source!r} has value {value!r}; expected 1, 0, -1 or blank")
        for target in mapping.get(source, ()):
            labels[target] = _stronger(labels[target], None if value is None else float(value))
    return labels


def map_findings(
    mapping: LabelMap, positives: Iterable[str], annotated: Iterable[str] | None = None
) -> tuple[dict[str, float | None], list[str]]:
    """Set-style labels: `positives` are present, every other source label in `annotated` (default:
    all of `mapping`) is absent. Returns (full LABEL_NAMES dict, positives not found in `mapping`)."""
    positives = list(dict.fromkeys(positives))
    unmapped = [p for p in positives if p not in mapping]
    present = set(positives)
    annotated = list(mapping) if annotated is None else list(annotated)
    values = {source: (1.0 if source in present else 0.0) for source in annotated}
    values.update({p: 1.0 for p in positives if p in mapping})
    return map_values(mapping, values), unmapped


def _markdown_table(mapping: LabelMap) -> list[str]:
    lines = ["| source label | LABEL_NAMES |", "|---|---|"]
    for source, targets in mapping.items():
        lines.append(f"| `{source}` | {', '.join(f'`{t}`' for t in targets) or '(none)'} |")
    return lines


def render_markdown() -> str:
    """The text of docs/labels.md: the vocabulary and one table per dataset."""
    lines = [
        "# Label vocabulary",
        "",
        "Generated from `data_tools/labels.py` by `python -m data_tools.labels > docs/labels.md`;",
        "`tests/test_sources.py` fails when the two differ. Edit the dicts, then regenerate.",
        "",
        "Every source adapter writes the full `LABEL_NAMES` vector, in this order, into `labels.npy`:",
        "1 present, 0 absent, -1 uncertain, NaN (`null` in the sample json) unknown.",
        "",
        "| index | name |",
        "|---|---|",
        *(f"| {i} | `{name}` |" for i, name in enumerate(LABEL_NAMES)),
    ]
    shown: dict[int, str] = {}  # id of a mapping already rendered -> the dataset it was shown under
    for dataset, mapping in DATASET_LABEL_MAPS.items():
        lines += ["", f"## {dataset}", "", DATASET_NOTES[dataset]]
        if id(mapping) in shown:
            lines += ["", f"Same table as {shown[id(mapping)]}."]
        elif mapping:
            lines += ["", *_markdown_table(mapping)]
            shown[id(mapping)] = dataset
    return "\n".join(lines) + "\n"


for _mapping in DATASET_LABEL_MAPS.values():
    check_label_map(_mapping)

if __name__ == "__main__":
    print(render_markdown(), end="")
