"""One direction between the parts: every import in the library (lazy ones inside functions too)
obeys the layer table below, and the layers have no cycle between them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Orchestrators at the top may use every layer.
ORCHESTRATORS = {"xray_pretrain.cli", "xray_pretrain.demo", "data_tools.cli", "xray_pretrain.commands"}

# layer -> the layers it may import (its own always allowed). A module belongs to the longest prefix.
ALLOWED = {
    "xray_core": set(),
    "data_tools": {"xray_core"},
    "xray_pretrain.models": set(),
    "xray_pretrain.collectives": set(),
    "xray_pretrain.report": set(),  # tokenizer, metrics, study grouping: no model, data or engine code
    "xray_pretrain.data": {"xray_core", "xray_pretrain.report"},  # report items: study grouping
    # A task's config section is a plain dataclass module that the config assembler imports.
    "xray_pretrain.tasks.classify_config": set(),
    "xray_pretrain.tasks.report_config": {"xray_pretrain.report"},
    "xray_pretrain.config": {
        "xray_pretrain.models",
        "xray_pretrain.data",
        "xray_pretrain.tasks.classify_config",
        "xray_pretrain.tasks.report_config",
    },
    "xray_pretrain.tasks": {
        "xray_pretrain.models",
        "xray_pretrain.data",
        "xray_pretrain.collectives",
        "xray_pretrain.config",
        "xray_pretrain.report",
        "xray_core",
    },  # fmt: skip
    "xray_pretrain.engine": {
        "xray_pretrain.models",
        "xray_pretrain.data",
        "xray_pretrain.collectives",
        "xray_pretrain.config",
        "xray_pretrain.tasks",
        "xray_core",
    },  # fmt: skip
    "xray_pretrain.bench": {"xray_pretrain.models", "xray_pretrain.data", "xray_pretrain.config"},
    # Using a trained checkpoint (evaluate / predict / embed): above the engine and the tasks.
    "xray_pretrain.inference": {
        "xray_pretrain.models",
        "xray_pretrain.data",
        "xray_pretrain.collectives",
        "xray_pretrain.config",
        "xray_pretrain.tasks",
        "xray_pretrain.engine",
        "xray_core",
    },  # fmt: skip
    # Pre-trained vs random init in one process (the demo's classification stage): as inference.
    "xray_pretrain.demo_classify": {
        "xray_pretrain.models",
        "xray_pretrain.data",
        "xray_pretrain.config",
        "xray_pretrain.tasks",
        "xray_pretrain.tasks.classify_config",
        "xray_pretrain.engine",
    },  # fmt: skip
    # The demo's report stage: a `finetune` launch, then the best checkpoint scored (above inference).
    "xray_pretrain.demo_report": {
        "xray_pretrain.data",
        "xray_pretrain.report",
        "xray_pretrain.engine",
        "xray_pretrain.inference",
    },  # fmt: skip
    "xray_pretrain": set(),  # the package __init__
}
PACKAGES = ("xray_core", "data_tools", "xray_pretrain")


def layer_of(module: str) -> str | None:
    if any(module == o or module.startswith(o + ".") for o in ORCHESTRATORS):
        return None
    matches = [layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")]
    return max(matches, key=len) if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the project modules `path` imports, anywhere in the file."""
    names = set()
    package = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
            names.add(base)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def library_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py"))


def test_every_library_import_follows_the_layer_table():
    violations = []
    for path in library_modules():
        here = layer_of(module_name(path))
        if here is None:
            continue
        for name in imports_of(path):
            there = layer_of(name)
            if there is None and any(name == o or name.startswith(o + ".") for o in ORCHESTRATORS):
                violations.append(f"{module_name(path)} imports the orchestrator {name}")
            elif there is not None and there != here and there not in ALLOWED[here]:
                violations.append(f"{module_name(path)} ({here}) imports {name} ({there})")
    assert not violations, "\n".join(violations)


def test_the_layers_have_no_cycle():
    edges = {layer: set(allowed) for layer, allowed in ALLOWED.items()}
    state: dict[str, str] = {}

    def visit(layer: str, trail: tuple[str, ...]) -> None:
        if state.get(layer) == "done":
            return
        if state.get(layer) == "open":
            pytest.fail("layer cycle: " + " -> ".join((*trail, layer)))
        state[layer] = "open"
        for nxt in edges[layer]:
            visit(nxt, (*trail, layer))
        state[layer] = "done"

    for layer in edges:
        visit(layer, ())


def test_every_package_folder_has_an_init():
    """find_packages skips a folder without __init__.py: a wheel would silently lack it."""
    missing = sorted(
        str(folder.relative_to(REPO_ROOT))
        for package in PACKAGES
        for folder in [REPO_ROOT / package, *(REPO_ROOT / package).rglob("*")]
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py"))
        and not (folder / "__init__.py").is_file()
    )  # fmt: skip
    assert not missing, missing
