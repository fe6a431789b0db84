"""The module layers of docs/design.md section 2 hold in the code: every ``histoseg`` import points to the same
layer or below, nothing imports the command line, and only layer 6 imports ``pipeline`` and ``training``. Read
from the source (``ast``), so a lazy import inside a function counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import histoseg

# docs/design.md, "Modules as built": the top-level modules and packages of histoseg and their layers
LAYERS = {
    "types": 0, "errors": 0, "config": 0, "atomic": 0,
    "io": 1, "models": 1, "datasets": 1, "metrics": 1, "distributed": 1,
    "tiling": 2,
    "inference": 3, "postprocess": 3, "tta": 3,
    "stitching": 4, "export": 4,
    "report": 5, "pipeline": 5,
    "cli": 6, "training": 6, "cohort": 6,
}  # fmt: skip
ROOT = Path(histoseg.__file__).parent


def imports_of(path: Path) -> list[tuple[str, int]]:
    """The top-level histoseg modules ``path`` imports (``histoseg.X...`` -> ``X``), with their line numbers."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "histoseg"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "histoseg" and len(parts) > 1 and parts[1] in LAYERS:
                out.append((parts[1], node.lineno))
    return out


def test_every_module_has_a_layer() -> None:
    tops = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    tops.discard("__init__")
    assert tops == set(LAYERS), "a new top-level module needs its layer here and in docs/design.md"


def test_imports_point_downward() -> None:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        own = rel.parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for target, line in imports_of(path):
            if target == own:
                continue
            beside = target in ("pipeline", "training") and LAYERS[own] < 6  # only layer 6 may import them
            if LAYERS[target] > LAYERS[own] or (target == "cli" and own != "cli") or beside:
                bad.append(f"{rel}:{line} (layer {LAYERS[own]}) imports histoseg.{target} (layer {LAYERS[target]})")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The check itself: a layer-1 module importing post-processing (layer 3) is found, top level or lazy."""
    mod = tmp_path / "card.py"
    mod.write_text(
        "from histoseg.postprocess.watershed import WatershedParams\n"
        "def f():\n    import histoseg.cli.main\n    from histoseg import export\n"
    )
    assert imports_of(mod) == [("postprocess", 1), ("cli", 3), ("export", 4)]
