"""The multi-task nuclei network (HoVer-Net style) in plain PyTorch.

A residual encoder (full-resolution stem, four stages at strides 2-16) feeds a shared decoder trunk back
to stride 2; the NP (nucleus vs background) and HV (horizontal/vertical distance maps) outputs refine at
stride 2 and at full resolution with a full-resolution skip from the stem, either in two branches
(``heads="separate"``) or in one trunk that predicts all four channels (``heads="shared"``).

Three switches trade multiply-accumulates for capacity (issue: CPU speed), measured with
``benchmarks/limit.py``: ``block="bottleneck"`` (1x1 reduce to half the channels, 3x3, 1x1 expand) costs
about a fifth of a basic block's two 3x3 convolutions; ``decoder="bottleneck"`` fuses each skip
concatenation with a 1x1 convolution before its 3x3; ``heads="shared"`` halves the full-resolution work,
the largest single cost of the network. The defaults are the original architecture, so older cards load
the same network. The optional TP
head (nucleus types, one independent sigmoid per class: UniSeg's class-independent output) refines at
stride 2 only: a type is read as one vote per nucleus over its mask, so it needs no full-resolution
detail, and the head adds about 2% to the network's MACs instead of the 11% a full head costs. ``type_head="context"``
reads the encoder's stride-16 and stride-8 features and the decoder's stride-4 map instead (a cell's type
is told by its neighbourhood, ~50 µm around it, more than by its own pixels), so it can be trained on a
frozen trunk: the types are added without changing the NP/HV maps (:mod:`histoseg.training.typehead`). Every
convolution is followed by BatchNorm: its running statistics are the source statistics used by test-time
adaptation. The network knows tensors, not slides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histoseg.models.arch import (  # noqa: F401 - re-exported: the architecture record
    BLOCK_CHOICES,
    DECODER_CHOICES,
    HEADS_CHOICES,
    STRIDE,
    SWITCH_DEFAULTS,
    NetConfig,
)


def conv_bn(cin: int, cout: int, stride: int = 1, relu: bool = True, kernel: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Basic residual block: two 3x3 conv-BN, identity skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = conv_bn(c, c)
        self.b = conv_bn(c, c, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(self.a(x)))


class BottleneckBlock(nn.Module):
    """Residual bottleneck: 1x1 to half the channels, 3x3, 1x1 back; identity skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        m = max(8, c // 2)
        self.a = conv_bn(c, m, kernel=1)
        self.b = conv_bn(m, m)
        self.c = conv_bn(m, c, relu=False, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.c(self.b(self.a(x))))


def fuse(cin: int, cout: int, kind: str) -> nn.Sequential:
    """Decoder fusion of an upsampled map with its skip: one 3x3, or a 1x1 reduction then a 3x3."""
    if kind == "bottleneck":
        return nn.Sequential(conv_bn(cin, cout, kernel=1), conv_bn(cout, cout))
    return conv_bn(cin, cout)


class Head(nn.Module):
    """One output branch: refine at stride 2, upsample, fuse the full-resolution skip, predict."""

    def __init__(self, c_half: int, c_full: int, out: int) -> None:
        super().__init__()
        self.refine = conv_bn(c_half, c_full)
        self.full = conv_bn(2 * c_full, c_full)
        self.out = nn.Conv2d(c_full, out, 1)

    def forward(self, d2: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.refine(d2)
        x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        x = self.full(torch.cat([x, skip], dim=1))
        out: torch.Tensor = self.out(x)
        return out


class TypeHead(nn.Module):
    """Type branch: refine at stride 2, per-class logits at stride 2."""

    def __init__(self, c_half: int, c_mid: int, out: int) -> None:
        super().__init__()
        self.refine = conv_bn(c_half, c_mid)
        self.out = nn.Conv2d(c_mid, out, 1)

    def forward(self, d2: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.out(self.refine(d2))
        return logits


class ContextTypeHead(nn.Module):
    """Type branch on the encoder's context: stride-16 features reduced (1x1) and brought to stride 8, fused
    with the stride-8 features and refined, brought to stride 4 and fused with the decoder's stride-4 map,
    per-class logits at stride 4. About 7% of the default network's MACs (most of
    it at stride 4); at some output phases its receptive field reaches 3 px beyond the NP/HV heads' (111
    against 108 px at widths 8 and 32), which the halo's rounding to the stride absorbs for the shipped default."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        c8, c4 = 2 * width, max(8, width // 2)
        self.refine16 = conv_bn(8 * width, c8, kernel=1)
        self.fuse8 = conv_bn(c8 + 4 * width, c8)
        self.refine8 = conv_bn(c8, c8)
        self.fuse4 = conv_bn(c8 + 2 * width, c4)
        self.out = nn.Conv2d(c4, out, 1)

    def forward(self, f16: torch.Tensor, f8: torch.Tensor, d4: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.refine16(f16), size=f8.shape[-2:], mode="nearest")
        x = self.refine8(self.fuse8(torch.cat([x, f8], dim=1)))
        x = F.interpolate(x, size=d4.shape[-2:], mode="nearest")
        logits: torch.Tensor = self.out(self.fuse4(torch.cat([x, d4], dim=1)))
        return logits


class NucleiNet(nn.Module):
    """HoVer-Net-style multi-task network.

    ``forward`` returns a dict: ``np`` (B, 2, H, W) logits, ``hv`` (B, 2, H, W) in [-1, 1] (tanh),
    and ``tp`` (B, n_types, H, W) per-class logits (independent sigmoids, no background channel) when the
    model has a type head: upsampled from the head's grid to every pixel (nearest), or with ``native_types``
    on the head's own grid (``cfg.type_stride`` pixels a cell; what inference keeps, ``models.typemap``).
    """

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        c_full = max(8, w // 2)
        self.stem = conv_bn(3, c_full)
        chans = [w, 2 * w, 4 * w, 8 * w]
        stages: list[nn.Module] = []
        cin = c_full
        block = BottleneckBlock if cfg.block == "bottleneck" else ResBlock
        for c, n in zip(chans, cfg.blocks, strict=True):
            stages.append(nn.Sequential(conv_bn(cin, c, stride=2), *[block(c) for _ in range(n)]))
            cin = c
        self.stages = nn.ModuleList(stages)
        dec = [3 * w, 2 * w, w]  # decoder widths at strides 8, 4, 2
        self.dec8 = fuse(chans[3] + chans[2], dec[0], cfg.decoder)
        self.dec4 = fuse(dec[0] + chans[1], dec[1], cfg.decoder)
        self.dec2 = fuse(dec[1] + chans[0], dec[2], cfg.decoder)
        self.np_head: Head | None = None
        self.hv_head: Head | None = None
        self.head: Head | None = None  # shared NP + HV trunk: channels 0-1 NP logits, 2-3 HV
        if cfg.heads == "shared":
            self.head = Head(dec[2], c_full, 4)
        else:
            self.np_head = Head(dec[2], c_full, 2)
            self.hv_head = Head(dec[2], c_full, 2)
        self.tp_head: TypeHead | ContextTypeHead | None = None
        if cfg.n_types > 0:
            self.tp_head = (
                ContextTypeHead(w, cfg.n_types) if cfg.type_head == "context" else TypeHead(dec[2], c_full, cfg.n_types)
            )

    @staticmethod
    def _up_cat(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1)

    def trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The shared trunk: the stem's map, the four encoder stages' maps (strides 2-16), and the decoder's
        maps at strides 4 and 2 (what the heads read; a type head trained on a frozen trunk reads them too)."""
        s0 = self.stem(x)
        feats = []
        h = s0
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        d = self.dec8(self._up_cat(feats[3], feats[2]))
        d4 = self.dec4(self._up_cat(d, feats[1]))
        return s0, feats, d4, self.dec2(self._up_cat(d4, feats[0]))

    def forward(self, x: torch.Tensor, native_types: bool = False) -> dict[str, torch.Tensor]:
        s0, feats, d4, d = self.trunk(x)
        if self.head is not None:
            y = self.head(d, s0)
            out = {"np": y[:, :2], "hv": torch.tanh(y[:, 2:])}
        elif self.np_head is not None and self.hv_head is not None:
            out = {"np": self.np_head(d, s0), "hv": torch.tanh(self.hv_head(d, s0))}
        else:  # unreachable: __init__ builds either the shared trunk or both branches
            raise RuntimeError("network built without NP/HV heads")
        if self.tp_head is not None:
            if isinstance(self.tp_head, ContextTypeHead):
                tp = self.tp_head(feats[3], feats[2], d4)
            else:
                tp = self.tp_head(d)
            out["tp"] = tp if native_types else F.interpolate(tp, size=s0.shape[-2:], mode="nearest")
        return out


def receptive_radius(cfg: NetConfig) -> int:
    """Radius in input pixels of the region that can influence one output pixel (theoretical), the largest
    over the ``STRIDE`` output phases.

    Derived, not guessed: a copy of the network with all-positive weights and identity BatchNorm is
    linear-positive, so the gradient of an output with respect to the input is non-zero exactly over its
    theoretical receptive field. The field is a product of two intervals (square kernels, separable
    resampling), and its extent above and below an output row depends on the row's phase modulo ``STRIDE``
    (strided convolutions and upsampling): one backward pass over a batch of ``STRIDE`` narrow images, image
    ``k`` differentiating the sum of output row ``c + k``, measures every phase at once; columns are measured
    the same way on the transposed images. (Measured at one phase, the shipped typed network's radius was 108
    where another phase reaches 111.)
    """
    net = NucleiNet(cfg).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                if m.running_mean is not None and m.running_var is not None:
                    m.running_mean.zero_()
                    m.running_var.fill_(1.0)
                m.weight.fill_(1.0)
                m.bias.zero_()
    size = 512
    while True:
        c = size // 2
        radius = max(_row_reach(net, size, c, transpose) for transpose in (False, True))
        if radius < c - STRIDE:  # every measured field lies inside the image: it is the whole field
            return radius
        size *= 2


def _row_reach(net: NucleiNet, size: int, c: int, transpose: bool) -> int:
    """Largest distance from output row ``c + k`` (``k < STRIDE``) to an input row influencing it, in images of
    ``size`` x ``STRIDE`` pixels (columns when ``transpose``)."""
    shape = (STRIDE, 3, STRIDE, size) if transpose else (STRIDE, 3, size, STRIDE)
    x = torch.ones(*shape, dtype=torch.float64, requires_grad=True)
    outs = net(x)
    total = x.new_zeros(())
    for k in range(STRIDE):  # image k: the sum of output row (column) c + k, every head and channel
        for o in outs.values():
            total = total + (o[k, :, :, c + k].sum() if transpose else o[k, :, c + k, :].sum())
    total.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    reach = 0
    for k in range(STRIDE):
        g = grad[k].abs().sum(dim=(0, 1) if transpose else (0, 2))  # influence per input row (column)
        nz = torch.nonzero(g > 0).flatten()
        reach = max(reach, int(c + k - nz.min()), int(nz.max() - c - k))
    return reach
