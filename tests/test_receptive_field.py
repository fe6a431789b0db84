"""The network's receptive field, which sets the halo and so the exactness at region borders.

Every expected number is derived independently of ``receptive_radius``: by hand from the layer list
(``test_receptive_radius_matches_hand_derivation``) and numerically, by perturbing input rows of a random float64
network.
"""

from __future__ import annotations

import pytest
import torch

from histoseg.models import NetConfig, receptive_radius
from histoseg.models.network import STRIDE

from .nets import SMALL, random_net


@pytest.fixture(scope="module")
def small_radius() -> int:
    """``receptive_radius(SMALL)``, computed once (a few seconds of float64 autograd)."""
    return receptive_radius(SMALL)


def test_receptive_radius_matches_hand_derivation(small_radius: int) -> None:
    """Hand derivation for NetConfig(width=8), blocks (b1, b2, b3, b4) = (1, 1, 1, 1).

    Work in 1-D (every layer is a square 3x3 convolution, a 1x1 convolution or a nearest 2x upsample,
    so the receptive field is a product of two intervals). Rules, from output interval [lo, hi] back to
    input: 3x3 conv, stride s, padding 1 -> [s*lo - 1, s*hi + 1]; nearest 2x upsample -> [lo//2, hi//2];
    ResBlock (two 3x3 convs) -> [lo - 2, hi + 2]. Output pixel p = 0 (a multiple of STRIDE):

        out 1x1                          [0, 0]
        head.full 3x3 (full res)         [-1, 1]   -> stem skip s0: [-1, 1]
        upsample to full                 [-1, 0]   (refine output, stride 2)
        head.refine 3x3                  [-2, 1]   (d2, stride 2)
        dec2 3x3                         [-3, 2]   -> f1 skip [-3, 2]; upsample -> dec4 [-2, 1]
        dec4 3x3                         [-3, 2]   -> f2 skip [-3, 2]; upsample -> dec8 [-2, 1]
        dec8 3x3                         [-3, 2]   -> f3 skip [-3, 2]; upsample -> f4 [-2, 1]
        stage 4: ResBlock, conv s2       [-4, 3] -> f3 [-9, 7]     (hull with skip [-3, 2])
        stage 3: ResBlock, conv s2       [-11, 9] -> f2 [-23, 19]
        stage 2: ResBlock, conv s2       [-25, 21] -> f1 [-51, 43]
        stage 1: ResBlock, conv s2       [-53, 45] -> s0 [-107, 91]
        stem 3x3                         x [-108, 92]

    In general the extent above/left is 48 + 4*(b1 + 2*b2 + 4*b3 + 8*b4) and below/right
    32 + 4*(b1 + 2*b2 + 4*b3 + 8*b4) at this phase; so (1, 1, 1, 1) -> 108 and (0, 0, 0, 0) -> 48.
    Other phases p mod 16 reach at most 107 on one side and 93 on the other
    (checked numerically in ``test_receptive_field_numerically_all_phases``), so the radius is 108.
    """
    assert small_radius == 108
    assert receptive_radius(NetConfig(width=8, blocks=(0, 0, 0, 0))) == 48


def _measured_field(cfg: NetConfig) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """Perturb one whole input row at a time in a random float64 network and see which output rows
    change. Sixteen consecutive perturbed rows cover every phase modulo STRIDE, and one forward pass
    shows the effect on every output row, so this measures the receptive field of every output phase
    with no knowledge of the architecture. Returns how far above and below an output row an input row still
    influences it, and those extents per output phase."""
    net = random_net(cfg, seed=1)
    h, w = 20 * STRIDE, STRIDE
    x0 = torch.rand(1, 3, h, w, dtype=torch.float64)
    rows = list(range(10 * STRIDE, 11 * STRIDE))  # 160..175: every residue mod 16, fields inside the image
    xs = x0.repeat(len(rows) + 1, 1, 1, 1)
    for k, r in enumerate(rows):
        xs[k + 1, :, r, :] += 1.0
    with torch.no_grad():
        out = net(xs)
    # largest change per (perturbation, output row) over heads, channels and columns
    diff = torch.stack([(o[1:] - o[:1]).abs().amax(dim=(1, 3)) for o in out.values()]).amax(0)
    # inside the field the effect is >= ~1e-6 with this init; outside it is exactly 0 (same inputs,
    # same arithmetic); 1e-9 separates the two with a wide margin either way
    above = below = 0  # how far above / below an output row an input row still influences it
    per_phase: dict[int, tuple[int, int]] = {}
    for k, r in enumerate(rows):
        affected = torch.nonzero(diff[k] > 1e-9).flatten().tolist()
        assert affected == list(range(affected[0], affected[-1] + 1))  # the field is one interval
        above = max(above, affected[-1] - r)
        below = max(below, r - affected[0])
        for p in affected:
            a, b = per_phase.get(p % STRIDE, (0, 0))
            per_phase[p % STRIDE] = (max(a, p - r), max(b, r - p))
    return above, below, per_phase


def test_receptive_field_numerically_all_phases(small_radius: int) -> None:
    above, below, per_phase = _measured_field(SMALL)
    assert (above, below) == (108, 93)
    assert per_phase[0] == (108, 92)  # the hand-derived extents at phase 0
    assert small_radius == max(above, below)


def test_receptive_radius_covers_every_phase_of_a_context_type_head() -> None:
    """The context type head reads stride-16 features: at phase 3 of 16 its field reaches 3 px farther than at
    phase 0 (measured by perturbation, as above). The radius is the largest over all phases, so a halo derived
    from it covers every output pixel (one phase alone said 108 for the shipped typed default, whose field
    reaches 111)."""
    cfg = NetConfig(width=8, n_types=2, type_head="context")
    above, below, per_phase = _measured_field(cfg)
    assert max(above, below) > max(per_phase[0])  # phase 0 alone would underestimate this network
    assert receptive_radius(cfg) == max(above, below) == 111


def test_translation_equivariance_by_stride() -> None:
    """Shifting the input by multiples of STRIDE shifts every head's output by the same amount, away
    from the borders (where zero padding differs); a shift of STRIDE / 2 does not."""
    net = random_net(NetConfig(width=8, n_types=2), seed=2)
    radius = 108  # hand-derived above
    dy, dx = STRIDE, 2 * STRIDE
    size = 16 * STRIDE  # 256: leaves 256 - 2 * 109 = 38 output pixels whose field is inside the input
    x = torch.rand(1, 3, size + dy, size + dx, dtype=torch.float64)
    with torch.no_grad():
        ref = net(x)
        shifted = net(x[:, :, dy : dy + size, dx : dx + size])
        half = net(x[:, :, STRIDE // 2 : STRIDE // 2 + size, dx : dx + size])
    lo, hi = radius + 1, size - radius - 1  # outputs whose whole field lies inside both inputs
    assert hi - lo >= 2 * STRIDE
    for key in ("np", "hv", "tp"):
        a = shifted[key][..., lo:hi, lo:hi]
        b = ref[key][..., dy + lo : dy + hi, dx + lo : dx + hi]
        assert a.std() > 1e-3  # not a constant map
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    c = half["np"][..., lo:hi, lo:hi]
    d = ref["np"][..., STRIDE // 2 + lo : STRIDE // 2 + hi, dx + lo : dx + hi]
    assert float((c - d).abs().max()) > 1e-3
