"""Random-walk label propagation from points: exact solves, adjoint gradients, seeds, pseudo-instances."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage.segmentation import find_boundaries

from histoseg.errors import ConfigError
from histoseg.metrics.instance import aji
from histoseg.training.randomwalk import (
    AffinityNet,
    Seeds,
    colour_points,
    edge_weights,
    make_seeds,
    pseudo_instances,
    random_walk,
)

# (cx, cy, semi-axis a, semi-axis b, angle): two touching pairs (one equal, one unequal), three on borders.
_FIXED = [
    (40.0, 40.0, 8.0, 6.0, 0.0),
    (55.5, 40.0, 7.5, 6.0, 0.0),
    (100.0, 120.0, 9.0, 7.0, 0.5),
    (100.0 + 14.0 * np.cos(0.5), 120.0 + 14.0 * np.sin(0.5), 5.5, 4.5, 0.5),
    (3.0, 80.0, 7.0, 5.0, 1.2),
    (150.0, 157.0, 8.0, 5.0, 0.3),
    (80.0, 2.0, 6.0, 4.0, 0.0),
]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_he(size: int = 160, n: int = 20, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) float RGB in [0, 1] (pink stroma, purple nuclei, blur, noise) and its instance map."""
    rng = np.random.default_rng(seed)
    ell = list(_FIXED)
    while len(ell) < n:
        a = rng.uniform(4.0, 10.0)
        cx, cy = rng.uniform(8, size - 8, 2)
        if all(np.hypot(cx - e[0], cy - e[1]) > a + e[2] + 4 for e in ell):
            ell.append((cx, cy, a, rng.uniform(3.5, min(a, 7.0)), rng.uniform(0, np.pi)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    best = np.full((size, size), np.inf)
    truth = np.zeros((size, size), np.int32)
    for k, (cx, cy, a, b, t) in enumerate(ell, 1):
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        r = np.hypot(u / a, v / b)
        inside = (r <= 1) & (r < best)  # touching ellipses: a pixel goes to the one it is deeper in
        truth[inside], best[inside] = k, r[inside]
    img = np.empty((size, size, 3))
    img[:] = (0.93, 0.72, 0.82)
    img += 0.2 * ndimage.gaussian_filter(rng.normal(size=(size, size, 1)), 4)  # stroma texture
    for k in range(1, len(ell) + 1):
        img[truth == k] = np.array([0.42, 0.26, 0.60]) + rng.uniform(-0.06, 0.06, 3)
    img = ndimage.gaussian_filter(img, (0.7, 0.7, 0)) + rng.normal(0, 0.03, img.shape)
    return np.clip(img, 0, 1), truth


def crop(img: np.ndarray, truth: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``size`` x ``size`` of the synthetic image, instances renumbered 1..N."""
    truth = truth[:size, :size]
    keep = np.unique(truth[truth > 0])
    return img[:size, :size], np.searchsorted(np.concatenate([[0], keep]), truth).astype(np.int32)


def centroids(truth: np.ndarray) -> np.ndarray:
    idx = np.arange(1, truth.max() + 1)
    cy_cx = np.array(ndimage.center_of_mass(np.ones_like(truth), truth, idx))
    return cy_cx[:, ::-1].copy()


def touching_pairs(truth: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((truth[:, :-1], truth[:, 1:]), (truth[:-1], truth[1:])):
        m = (a > 0) & (b > 0) & (a != b)
        pairs |= {(int(min(p, q)), int(max(p, q))) for p, q in zip(a[m], b[m], strict=True)}
    return pairs


def dense_hitting_probabilities(w_h: np.ndarray, w_v: np.ndarray, seeds: np.ndarray, k: int) -> np.ndarray:
    """Reference: build L = D - W densely and solve L_uu X_u = -L_us X_s with numpy."""
    h, w = seeds.shape
    idx = np.arange(h * w).reshape(h, w)
    wm = np.zeros((h * w, h * w))
    for a, b, wt in ((idx[:, :-1], idx[:, 1:], w_h), (idx[:-1], idx[1:], w_v)):
        wm[a.ravel(), b.ravel()] = wt.ravel()
        wm[b.ravel(), a.ravel()] = wt.ravel()
    lap = np.diag(wm.sum(1)) - wm
    s = seeds.ravel()
    u = s < 0
    xs = np.eye(k)[s[~u]]
    x = np.zeros((h * w, k))
    x[~u] = xs
    x[u] = np.linalg.solve(lap[np.ix_(u, u)], -lap[np.ix_(u, ~u)] @ xs)
    return x.T.reshape(k, h, w)


def tiny_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    w_h = torch.tensor(rng.uniform(0.1, 2.0, (6, 6)), dtype=torch.float64, requires_grad=True)
    w_v = torch.tensor(rng.uniform(0.1, 2.0, (5, 7)), dtype=torch.float64, requires_grad=True)
    seeds = torch.full((6, 7), -1, dtype=torch.long)
    seeds[0, 0] = seeds[4, 1] = 0
    seeds[5, 6] = 1
    seeds[2, 3] = 2
    return w_h, w_v, seeds


def test_gradcheck_adjoint_gradient() -> None:
    w_h, w_v, seeds = tiny_problem()
    assert torch.autograd.gradcheck(
        lambda a, b: random_walk(a, b, seeds, 3, tol=1e-13, max_iter=500), (w_h, w_v), eps=1e-6, atol=1e-6
    )


def test_matches_dense_dirichlet_solve_and_chain() -> None:
    w_h, w_v, seeds = tiny_problem()
    probs = random_walk(w_h, w_v, seeds, 3, tol=1e-12, max_iter=500).detach().numpy()
    ref = dense_hitting_probabilities(w_h.detach().numpy(), w_v.detach().numpy(), seeds.numpy(), 3)
    np.testing.assert_allclose(probs, ref, atol=1e-9)
    # A uniform 1 x 11 chain with label 1 at the left end and 0 at the right: P(label 1) falls linearly.
    chain = torch.full((1, 11), -1, dtype=torch.long)
    chain[0, 0], chain[0, 10] = 1, 0
    p = random_walk(torch.ones(1, 10, dtype=torch.float64), torch.ones(0, 11, dtype=torch.float64), chain, 2)
    np.testing.assert_allclose(p[1, 0].numpy(), np.linspace(1, 0, 11), atol=1e-6)


def test_synthetic_he_pseudo_instances_reach_aji_090() -> None:
    img, truth = synthetic_he()
    assert 15 <= truth.max() <= 25 and len(touching_pairs(truth)) >= 2
    assert truth[:, 0].any() and truth[0].any() and truth[-1].any()  # nuclei cut by the border
    pts = centroids(truth)
    seeds = make_seeds(pts, truth.shape, seed_radius=2.0, background_distance=13.0)
    w_h, w_v = edge_weights(torch.tensor(img.transpose(2, 0, 1), dtype=torch.float32))
    probs = random_walk(w_h, w_v, torch.from_numpy(seeds.labels), seeds.n_labels)
    inst, conf = pseudo_instances(probs, seeds, pts)
    assert aji(truth, inst) >= 0.9
    assert inst.dtype == np.int32 and set(np.unique(inst)) == set(range(truth.max() + 1))
    assert conf.dtype == np.float32 and conf.min() >= 0 and conf.max() <= 1
    assert conf[seeds.labels >= 0].min() == 1.0  # seeds are certain
    # Pure geometry (uniform weights) is clearly worse: the image term is what finds the boundaries.
    flat = random_walk(torch.ones_like(w_h), torch.ones_like(w_v), torch.from_numpy(seeds.labels), seeds.n_labels)
    assert aji(truth, pseudo_instances(flat, seeds, pts)[0]) < aji(truth, inst) - 0.1


def test_probabilities_sum_to_one_and_seeds_are_one_hot() -> None:
    img, truth = crop(*synthetic_he(seed=5), 96)
    pts = centroids(truth)
    seeds = make_seeds(pts, truth.shape, seed_radius=2.0, background_distance=12.0)
    w_h, w_v = edge_weights(torch.tensor(img.transpose(2, 0, 1), dtype=torch.float32), beta=4.0)
    probs = random_walk(w_h, w_v, torch.from_numpy(seeds.labels), seeds.n_labels, tol=1e-2)  # loose on purpose
    assert probs.shape == (seeds.n_labels, 96, 96) and probs.min() >= 0
    torch.testing.assert_close(probs.sum(0), torch.ones(96, 96))
    seeded = seeds.labels >= 0
    onehot = np.eye(seeds.n_labels, dtype=np.float32)[seeds.labels[seeded]].T
    assert np.array_equal(probs.numpy()[:, seeded], onehot)
    # A label without seeds is never reached; a single label is certain everywhere.
    chain = torch.tensor([[1, -1, -1, 0]])
    ones = torch.ones(1, 3)
    probs = random_walk(ones, torch.ones(0, 4), chain, 4)
    assert probs[2:].abs().max() == 0 and torch.allclose(probs.sum(0), torch.ones(1, 4))
    assert (random_walk(ones, torch.ones(0, 4), torch.tensor([[0, -1, -1, -1]]), 1) == 1).all()


def test_colour_points_separates_close_points_deterministically() -> None:
    rng = np.random.default_rng(1)
    pts = rng.uniform(0, 100, (120, 2))
    colours = colour_points(pts, 15.0)
    assert np.array_equal(colours, colour_points(pts.copy(), 15.0))
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    close = (d < 15.0) & ~np.eye(len(pts), dtype=bool)
    assert not (close & (colours[:, None] == colours[None])).any()
    assert colours.min() == 1 and set(np.unique(colours)) == set(range(1, colours.max() + 1))
    assert colours.max() <= close.sum(1).max() + 1  # greedy bound
    row = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [100.0, 0.0]])
    c = colour_points(row, 15.0)  # a path 0-1-2 and a lone point: two colours suffice
    assert c[0] != c[1] and c[1] != c[2] and c.max() == 2
    assert np.array_equal(colour_points(row, 0.0), [1, 1, 1, 1])


def test_make_seeds_places_discs_background_and_voronoi_edges() -> None:
    pts = np.array([[10.0, 10.0], [20.0, 10.0]])
    seeds = make_seeds(pts, (21, 31), seed_radius=2.0, background_distance=8.0)
    again = make_seeds(pts, (21, 31), seed_radius=2.0, background_distance=8.0)
    assert np.array_equal(seeds.labels, again.labels) and seeds.labels.dtype == np.int64
    lab, (c0, c1) = seeds.labels, seeds.point_colours
    assert c0 != c1 and seeds.n_labels == 3  # 10 px apart < 2 * 8
    assert lab[10, 10] == lab[10, 12] == lab[12, 10] == c0 and lab[10, 13] == -1  # disc of radius 2
    assert lab[10, 20] == lab[8, 20] == c1
    assert lab[10, 15] == lab[3, 15] == 0  # Voronoi edge (x = 15) between the two points
    assert lab[10, 14] == lab[10, 16] == -1
    assert lab[0, 0] == lab[10, 0] == 0 and lab[10, 1] == 0 and lab[10, 2] == -1  # farther than 8 px
    # Random points: every unseeded 4-connected region lies in one point's Voronoi cell.
    rng = np.random.default_rng(2)
    pts = rng.uniform(-3, 83, (40, 2))
    seeds = make_seeds(pts, (80, 80), seed_radius=1.5, background_distance=9.0)
    comp, n = ndimage.label(seeds.labels < 0)
    yy, xx = np.mgrid[0:80, 0:80]
    nearest = cKDTree(pts).query(np.stack([xx.ravel(), yy.ravel()], 1))[1].reshape(80, 80)
    assert n > 10 and all(np.unique(nearest[comp == c]).size == 1 for c in range(1, n + 1))
    empty = make_seeds(np.zeros((0, 2)), (5, 6), seed_radius=1.0, background_distance=3.0)
    assert empty.n_labels == 1 and (empty.labels == 0).all()


def test_pseudo_instances_keeps_component_of_the_point() -> None:
    pts = np.array([[2.0, 2.0], [7.0, 2.0]])
    seeds = Seeds(labels=np.full((5, 10), -1, np.int64), point_colours=np.array([1, 2]), n_labels=3)
    probs = np.zeros((3, 5, 10))
    probs[0] = 1.0
    probs[:, 1:4, 1:4] = [[[0.1]], [[0.8]], [[0.1]]]  # around point 0
    probs[:, 0:3, 6:9] = [[[0.3]], [[0.0]], [[0.7]]]  # around point 1
    probs[:, 4, 8:10] = [[0.2], [0.0], [0.8]]  # colour 2 again, detached from point 1: dropped
    inst, conf = pseudo_instances(probs, seeds, pts)
    assert (inst[1:4, 1:4] == 1).all() and (inst[0:3, 6:9] == 2).all()
    assert (inst == 1).sum() == 9 and (inst == 2).sum() == 9
    assert inst[4, 9] == 0 and conf[4, 9] == 0.0
    assert conf[2, 2] == pytest.approx(0.7) and conf[1, 7] == pytest.approx(0.4) and conf[0, 0] == 1.0


def test_invalid_inputs_raise_config_error() -> None:
    w_h, w_v, seeds = tiny_problem()
    with pytest.raises(ConfigError):
        random_walk(w_h, w_v[:-1], seeds, 3)
    with pytest.raises(ConfigError):
        random_walk(w_h, w_v, torch.full_like(seeds, -1), 3)  # no seed
    with pytest.raises(ConfigError):
        random_walk(w_h, w_v, seeds, 2)  # label 2 present
    with pytest.raises(ConfigError):
        random_walk(w_h.detach() * 0, w_v, seeds, 3)
    with pytest.raises(ConfigError):
        random_walk(w_h, w_v, seeds.double(), 3)
    with pytest.raises(ConfigError):
        make_seeds(np.zeros((2, 3)), (5, 5), seed_radius=1.0, background_distance=3.0)
    with pytest.raises(ConfigError):
        make_seeds(np.zeros((1, 2)), (5, 5), seed_radius=3.0, background_distance=3.0)
    with pytest.raises(ConfigError):
        colour_points(np.array([[0.0, np.nan]]), 1.0)
    with pytest.raises(ConfigError):
        edge_weights(torch.zeros(3, 4, 5), torch.zeros(4, 4))
    with pytest.raises(ConfigError):
        pseudo_instances(
            np.zeros((2, 5, 5)),
            make_seeds(np.zeros((0, 2)), (5, 5), seed_radius=1, background_distance=2),
            np.zeros((0, 2)),
        )


def test_edge_weights_formula_and_affinity_init() -> None:
    image = torch.zeros(1, 2, 3, dtype=torch.float64)
    image[0, :, 2] = 1.0  # one vertical step: 2 of the 7 neighbour pairs differ by 1, scale = 2/7
    edge = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    w_h, w_v = edge_weights(image, edge, beta=1.0, min_weight=1e-3)
    assert w_h.shape == (2, 2) and w_v.shape == (1, 3)
    torch.testing.assert_close(w_h[:, 1], torch.full((2,), np.exp(-3.5) + 1e-3, dtype=torch.float64))
    torch.testing.assert_close(w_v, torch.full((1, 3), 1.0 + 1e-3, dtype=torch.float64))
    w_h.sum().backward()
    assert edge.grad is not None and (edge.grad < 0).all()
    net = AffinityNet()
    out = net(torch.randn(2, 3, 17, 19))
    assert out.shape == (2, 1, 17, 19) and out.min() >= 0 and out.max() < 0.1


def test_affinity_net_learns_through_random_walk() -> None:
    torch.manual_seed(0)
    img, truth = crop(*synthetic_he(), 96)
    pts = centroids(truth)
    seeds = make_seeds(pts, truth.shape, seed_radius=2.0, background_distance=13.0)
    target = torch.from_numpy(np.where(truth > 0, seeds.point_colours[np.maximum(truth, 1) - 1], 0))
    free = torch.from_numpy(seeds.labels < 0)
    norm = (img - img.mean((0, 1))) / img.std((0, 1))
    image = torch.tensor(norm.transpose(2, 0, 1), dtype=torch.float32)
    net = AffinityNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    losses = []
    for _ in range(20):
        # beta = 0: no image term, so every boundary the walk respects must come from the learned edges.
        w_h, w_v = edge_weights(image, net(image[None])[0, 0], beta=0.0)
        probs = random_walk(w_h, w_v, torch.from_numpy(seeds.labels), seeds.n_labels)
        loss = -torch.log(probs.gather(0, target[None])[0].clamp_min(1e-6))[free].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    # What it learned is the nuclei's outlines: the edge map is far stronger on true boundaries.
    learned = net(image[None])[0, 0].detach().numpy()
    outline = find_boundaries(truth, mode="thick")
    assert learned[outline].mean() > 3 * learned[~outline].mean()
