"""``histoseg models``: the shipped models side by side, so a user can choose one for ``--model``.

Each row comes from the model's card (no network is built, nothing is measured here): its types, processing
resolution, halo, the card's MoNuSeg-test PQ and CRCHisto-validation weighted class F1, and where its
human-readable card is (the architecture, training data, licence terms and recipe). ``--json`` gives the same
as one JSON document, the licence text included.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

COLUMNS = ("model", "types", "µm/px", "halo px", "MoNuSeg-test PQ", "CRCHisto class F1", "card")


def add_models_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the ``models`` subcommand on the main parser's subparsers."""
    mp = sub.add_parser("models", help="list the shipped models: types, resolution, accuracy, card")
    mp.add_argument("--json", action="store_true", help="print the list as JSON (licence text included)")


def model_row(name: str) -> dict[str, Any]:
    """The record of one model (a registered name or a ``.safetensors`` path), from its card."""
    from histoseg.models.registry import card_markdown_name, resolve_model  # on use: not on every command's start

    art = resolve_model(name)
    card = art.card()
    typing = card.metrics.get("crchisto_typing", {})
    markdown = art.weights.with_name(card_markdown_name(art.weights.stem))
    return {
        "model": name,
        "types": list(card.class_names) if card.net.n_types else [],
        "mpp": card.mpp,
        "halo_px": card.halo_px(),
        "monuseg_test_pq": card.metrics.get("monuseg_test", {}).get("mean", {}).get("pq"),
        "crchisto_weighted_class_f1": typing.get("weighted_f1"),
        "crchisto_detection_f1": typing.get("det_f1"),
        "card": str(markdown) if markdown.is_file() else str(art.card_path),
        "description": card.description,
        "license": card.license,
    }


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The records as an aligned text table, a header first."""
    table = [
        [
            r["model"],
            ", ".join(r["types"]) or "untyped (Nucleus)",
            f"{r['mpp']:g}",
            str(r["halo_px"]),
            _cell(r["monuseg_test_pq"]),
            _cell(r["crchisto_weighted_class_f1"]),
            r["card"],
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(COLUMNS)]
    lines = (list(COLUMNS), *table)
    return ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def run_models(args: argparse.Namespace) -> int:
    from histoseg.models.registry import registered_models

    rows = [model_row(name) for name in registered_models()]
    print(json.dumps(rows, indent=1, ensure_ascii=False) if args.json else "\n".join(table_lines(rows)))
    return 0
