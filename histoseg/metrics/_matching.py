"""One-to-one matching on a sparse bipartite graph, solved per connected component."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def match_edges(
    rows: np.ndarray,
    cols: np.ndarray,
    cost: np.ndarray,
    n_rows: int,
    n_cols: int,
    *,
    cardinality_first: bool,
) -> np.ndarray:
    """Optimal one-to-one matching using only the given edges ``(rows[k], cols[k])``.

    ``cardinality_first=False``: minimise the total ``cost`` (every edge cost must be < 0, so that an
    edge always beats leaving both ends unmatched), i.e. a maximum-weight matching on ``-cost``.
    ``cardinality_first=True``: maximise the number of matched pairs, then minimise their total cost.

    The graph is split into connected components; a component with one edge is matched directly and
    the others are solved by ``linear_sum_assignment`` on a small dense matrix. Returns the indices of
    the chosen edges (int64), sorted by row.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    cost = np.asarray(cost, dtype=np.float64)
    if rows.size == 0:
        return np.zeros(0, np.int64)
    n = n_rows + n_cols
    graph = coo_matrix((np.ones(rows.size, np.int8), (rows, cols + n_rows)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    comp = labels[rows]
    single = np.bincount(comp)[comp] == 1
    chosen = [np.flatnonzero(single)]

    multi = np.flatnonzero(~single)
    if multi.size:
        multi = multi[np.argsort(comp[multi], kind="stable")]
        cuts = np.flatnonzero(np.diff(comp[multi])) + 1
        for group in np.split(multi, cuts):
            r_ids, r_loc = np.unique(rows[group], return_inverse=True)
            c_ids, c_loc = np.unique(cols[group], return_inverse=True)
            c = cost[group]
            if cardinality_first:
                # Affine map of the costs into [0, 1], then shift by -(k + 1): one more matched pair
                # then always lowers the total more than any change of the secondary cost can raise it.
                span = float(c.max() - c.min())
                c = (c - c.min()) / span if span > 0 else np.zeros_like(c)
                c = c - (min(r_ids.size, c_ids.size) + 1)
            dense = np.zeros((r_ids.size, c_ids.size))
            edge_at = np.full(dense.shape, -1, np.int64)
            dense[r_loc, c_loc] = c
            edge_at[r_loc, c_loc] = group
            ri, ci = linear_sum_assignment(dense)
            picked = edge_at[ri, ci]
            chosen.append(picked[picked >= 0])

    out = np.concatenate(chosen)
    return out[np.argsort(rows[out], kind="stable")]
