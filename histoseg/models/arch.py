"""The network's architecture record, without PyTorch: stride, switches and ``NetConfig``.

Kept apart from ``network.py`` so that what only reads a model card (planning, region tasks on an exported
engine: OpenVINO, ONNX Runtime) never imports torch: a worker process that imports it holds ~190 MB more
(issue 13: peak memory of 2 workers under 3 GB).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

STRIDE = 16  # total downsampling: input sides must be multiples of this
BLOCK_CHOICES = ("basic", "bottleneck")
DECODER_CHOICES = ("plain", "bottleneck")
HEADS_CHOICES = ("separate", "shared")
TYPE_STRIDES = {"stride2": 2, "context": 4}
"""The TP head choices and the stride of each one's own output grid: the network computes the type logits on it,
and inference keeps them there (:class:`histoseg.models.typemap.TypeMap`)."""
TYPE_HEAD_CHOICES = tuple(TYPE_STRIDES)


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters (stored in the model card)."""

    width: int = 32
    blocks: tuple[int, int, int, int] = (1, 1, 1, 1)
    n_types: int = 0  # 0: no TP head (single "nucleus" class)
    block: str = "basic"  # residual block of the encoder stages: one of BLOCK_CHOICES
    decoder: str = "plain"  # decoder fusion: one of DECODER_CHOICES
    heads: str = "separate"  # NP and HV branches: one of HEADS_CHOICES
    type_head: str = "stride2"  # the TP head (when n_types > 0): one of TYPE_HEAD_CHOICES

    @property
    def type_stride(self) -> int:
        """Input pixels per cell of the type head's own output grid (:data:`TYPE_STRIDES`)."""
        return TYPE_STRIDES[self.type_head]

    def to_dict(self) -> dict[str, object]:
        """The card's architecture record; a switch at its default is left out, so older cards stay byte-identical."""
        d = asdict(self)
        d["blocks"] = list(self.blocks)
        for key, default in SWITCH_DEFAULTS.items():
            if d[key] == default:
                del d[key]
        return d

    @staticmethod
    def from_dict(d: dict[str, object]) -> NetConfig:
        blocks = d.get("blocks", (1, 1, 1, 1))
        cfg = NetConfig(
            width=int(d.get("width", 32)),  # type: ignore[call-overload]
            blocks=tuple(int(b) for b in blocks),  # type: ignore[union-attr, arg-type, attr-defined]
            n_types=int(d.get("n_types", 0)),  # type: ignore[call-overload]
            **{key: str(d.get(key, default)) for key, default in SWITCH_DEFAULTS.items()},
        )
        return cfg

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError for an architecture that cannot be built."""
        if len(self.blocks) != 4 or min(self.blocks) < 0 or self.width < 1 or self.n_types < 0:
            raise ValueError(f"invalid architecture {self}: need 4 block counts >= 0, width >= 1, n_types >= 0")
        for name, value, choices in (
            ("block", self.block, BLOCK_CHOICES),
            ("decoder", self.decoder, DECODER_CHOICES),
            ("heads", self.heads, HEADS_CHOICES),
            ("type_head", self.type_head, TYPE_HEAD_CHOICES),
        ):
            if value not in choices:
                raise ValueError(f"invalid architecture: {name} must be one of {', '.join(choices)}, got {value!r}")


SWITCH_DEFAULTS: dict[str, str] = {f.name: f.default for f in fields(NetConfig) if isinstance(f.default, str)}
"""The architecture switches and their defaults (the original network), read from ``NetConfig`` itself."""
