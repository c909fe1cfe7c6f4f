"""The package's layers import downwards only (docs/ARCHITECTURE.md), lazy imports inside functions included.

A lower layer never imports a higher one; the recipe reads three registries (objective kinds, tracker names, GGUF
types and output formats) from leaf modules that import nothing above `core`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "psft_lite"
LAYERS = ["core", "recipe", "data", "model", "tracking", "inference", "exporting", "training", "study", "api", "cli"]
REGISTRIES = {  # leaf modules the recipe validates names against
    "psft_lite.training.objectives",
    "psft_lite.tracking.trackers",
    "psft_lite.exporting.outputs",
    "psft_lite.exporting.gguf_convert",
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if module == "psft_lite.__main__":
        return "cli"
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"  # psft_lite/__init__: the version


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("psft_lite"):
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("psft_lite")}
    return found


def modules() -> list[tuple[str, Path]]:
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        rel = p.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, p))
    return out


def _module_part(imported: str) -> str:
    """`psft_lite.model.loading.load_base_model` → the module it names (`psft_lite.model.loading`)."""
    parts = imported.split(".")
    while len(parts) > 1:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return imported


@pytest.mark.parametrize("name,path", modules(), ids=[m for m, _ in modules()])
def test_imports_point_down(name, path):
    mine = LAYERS.index(layer_of(name))
    upward = []
    for imported in imports(path):
        target = _module_part(imported)
        if target == "psft_lite" or target.startswith(name):
            continue
        if layer_of(name) == "recipe" and any(target.startswith(r) for r in REGISTRIES):
            continue
        if LAYERS.index(layer_of(target)) > mine:
            upward.append(target)
    assert not upward, f"{name} ({layer_of(name)}) imports a higher layer: {sorted(set(upward))}"


LEAVES = {"psft_lite.model.chat"}  # imports nothing from psft_lite


@pytest.mark.parametrize("registry", sorted(REGISTRIES))
def test_registries_import_nothing_above_core_at_import_time(registry):
    """The recipe imports them to validate names, so loading a recipe stays cheap; what a registered entry needs is
    imported inside the function that uses it."""
    path = PACKAGE.parent.joinpath(*registry.split("."))
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    for f in files:
        for imported in imports(f, top_level_only=True):
            target = _module_part(imported)
            assert target.startswith(registry) or layer_of(target) == "core" or target in LEAVES, (
                f"{f.name} imports {target} at import time"
            )
    for leaf in LEAVES:
        assert not imports(PACKAGE.parent.joinpath(*leaf.split(".")).with_suffix(".py")), leaf


def test_no_module_cites_a_document_outside_the_repository():
    for _, path in modules():
        text = path.read_text()
        assert "DESIGN.md" not in text and "../shared" not in text, path


def test_no_subpackage_shadows_a_public_function():
    """Importing psft_lite.X sets the package's attribute X to the module, so a subpackage named like a public
    function (psft_lite.export once was) would replace that function as soon as anything imports the room."""
    import psft_lite

    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} | {p.stem for p in PACKAGE.glob("*.py")}
    assert not rooms & set(psft_lite.__all__), rooms & set(psft_lite.__all__)
