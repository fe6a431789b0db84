"""Resolve ``--model NAME|PATH`` to weights + card and load them without unpickling anything.

A model artifact is ``<stem>.safetensors`` with ``<stem>.json`` (the card) beside it. Registered names
are the artifacts shipped in ``histoseg/models/weights/``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from histoseg.atomic import atomic_file
from histoseg.errors import ConfigError, ModelError, OutputError
from histoseg.models.card import ModelCard

if TYPE_CHECKING:  # torch is imported only to load or save weights (see histoseg.models)
    from histoseg.models.network import NucleiNet

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


ADAPTED_SUFFIX = ".adapted.safetensors"
"""File-name ending of a slide's adapted weights, ``OUT/<stem>/<stem>.adapted.safetensors``: files derived from
them (an engine's exported graph) live beside them and go with them, not in the shared cache."""


@dataclass(frozen=True)
class ModelArtifact:
    """Paths of one model on disk; cheap to pass to workers (they load it themselves)."""

    weights: Path
    card_path: Path

    @property
    def per_slide(self) -> bool:
        """Whether these are one slide's adapted weights (an intermediate in that slide's output folder)."""
        return self.weights.name.endswith(ADAPTED_SUFFIX)

    @property
    def name(self) -> str:
        return self.weights.stem

    def card(self) -> ModelCard:
        return ModelCard.load(self.card_path)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.weights, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def registered_models() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors") if p.with_suffix(".json").exists())


def card_markdown_name(name: str) -> str:
    """The human-readable card of a shipped model: ``MODEL_CARD.md`` for the default, ``<NAME>_MODEL_CARD.md``
    for the others (beside the weights)."""
    return "MODEL_CARD.md" if name == "default" else f"{name.upper()}_MODEL_CARD.md"


def resolve_model(name_or_path: str) -> ModelArtifact:
    """A registered name (``default``, ...) or a path to a ``.safetensors`` file (card beside it)."""
    p = Path(name_or_path)
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if p.suffix != ".safetensors":
        cand = WEIGHTS_DIR / f"{name_or_path}.safetensors"
        if not cand.exists():
            known = ", ".join(registered_models()) or "none"
            raise ModelError(
                f"unknown model {name_or_path!r}: not a .safetensors path and not a registered name "
                f"(registered: {known})"
            )
        p = cand
    if not p.exists():
        raise ModelError(f"model weights not found: {p}")
    card = p.with_suffix(".json")
    if not card.exists():
        raise ModelError(f"model card not found beside the weights: {card}")
    return ModelArtifact(weights=p.resolve(), card_path=card.resolve())


def load_model(artifact: ModelArtifact, device: str = "cpu") -> tuple[NucleiNet, ModelCard]:
    """Build the network from its card and load safetensors weights (never pickle); eval mode."""
    from safetensors.torch import load_file

    from histoseg.models.network import NucleiNet

    card = artifact.card()
    net = NucleiNet(card.net)
    try:
        state = load_file(str(artifact.weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read weights {artifact.weights}: {exc}") from exc
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # one line: torch lists every mismatching tensor on its own line
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln] or [str(exc).splitlines()[0]]
        more = f" (and {len(lines) - 1} more tensors)" if len(lines) > 1 else ""
        raise ModelError(
            f"weights {artifact.weights} do not match the card's architecture: {lines[0].rstrip('.')}{more}"
        ) from exc
    if missing or unexpected:
        raise ModelError(
            f"weights {artifact.weights} do not match the card's architecture "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    net.eval()
    return net.to(device), card


def save_model(net: NucleiNet, card: ModelCard, weights_path: str | Path, half: bool = False) -> ModelArtifact:
    """Write ``<stem>.safetensors`` and ``<stem>.json``.

    ``half`` stores floating tensors as float16 (shipped weights: half the size); loading casts them back
    to the network's float32 parameters.
    """
    from safetensors.torch import save_file

    wp = Path(weights_path)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    # one metadata key: safetensors orders metadata keys differently in each process, and the artifact's hash
    # (its identity for resuming and provenance) must not depend on the process that wrote it
    with atomic_file(wp) as tmp:  # a full disk or a kill never leaves half a weights file
        try:
            save_file(state, str(tmp), metadata={"format": "histoseg-nucleinet"})
        except SafetensorError as exc:  # its I/O errors (a full disk) are not OSErrors
            raise OutputError(f"cannot write model weights {wp}: {exc}") from exc
    card.save(wp.with_suffix(".json"))
    return ModelArtifact(weights=wp.resolve(), card_path=wp.with_suffix(".json").resolve())


def check_not_a_model_source(target: str | Path, *sources: ModelArtifact) -> None:
    """Refuse to write an artifact over ``sources`` or over any shipped model (ConfigError).

    ``target`` is a ``.safetensors`` path; its card (``.json`` beside it) is checked too.
    """
    out = Path(target).resolve()
    outs = {out, out.with_suffix(".json")}
    protected = {p for a in sources for p in (a.weights.resolve(), a.card_path.resolve())}
    if outs & protected:
        raise ConfigError(f"--output {target} is the model being adapted; write the adapted model to another file")
    if out.parent == WEIGHTS_DIR.resolve():
        raise ConfigError(f"--output {target} is inside histoseg's shipped models ({WEIGHTS_DIR}); choose another path")
