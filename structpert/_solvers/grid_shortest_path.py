"""Shortest paths on a grid of node costs (the Warcraft maps), batched in JAX."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .base import AbstractBatchedSolver, register_solver


# Neighbour offsets (row, column). The order is the tie-break order of the relaxation.
_OFFSETS = {
    4: ((-1, 0), (0, -1), (0, 1), (1, 0)),
    8: ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)),
}


@register_solver("grid_shortest_path")
class GridShortestPath(AbstractBatchedSolver):
    """The cheapest path from the top-left to the bottom-right cell of a grid.

    `theta` of shape `(H, W)` is **minus** the cost of each cell; `y` of the same shape
    is the 0/1 indicator of the cells on an optimal path, both end cells included (the
    Warcraft convention of Vlastelica et al. 2020 and Berthet et al. 2020). A path
    moves between 8-neighbours (or 4-neighbours), so with node costs $c = -\\theta
    \\ge 0$ the solver returns

    $$y^*(\\theta) = \\arg\\max_{y \\in \\mathcal{P}} \\langle y, \\theta\\rangle
    = \\arg\\min_{y \\in \\mathcal{P}} \\sum_{v} c_v y_v,$$

    where $\\mathcal{P}$ is the set of indicators of simple paths from $(0, 0)$ to
    $(H-1, W-1)$.

    **Algorithm.** Bellman-Ford relaxation over the whole batch at once (batch on the
    last axis): each sweep takes the minimum over the shifted copies of the distance
    map, until nothing cheaper than the target cell changes (at most $HW$ sweeps);
    then a walk from the target back to the source follows the cheapest neighbours
    (at most $HW$ steps). Both loops are bounded and the whole batch runs as one
    kernel (no Python loop, no host callback); it is exact.

    **Negative costs** (`theta > 0`, e.g. after additive noise) create negative
    cycles, for which a cheapest path is not defined (the cheapest *simple* path is
    NP-hard). Entries with `theta > 0` are therefore treated as zero cost: the solver
    returns the optimal path for the costs $\\max(c, 0)$, i.e. for
    $\\min(\\theta, 0)$, which is always a valid simple path. Prefer the
    multiplicative perturbation (`PerturbedOptimizer(..., perturbation=
    "multiplicative")` with `theta < 0`), which keeps every cost positive.

    **Ties** are broken deterministically: the same `theta` gives the same path, for
    any batch size, under `jit` and `vmap`. Walking back, each cell steps to the
    neighbour of least distance; among equals, to the one whose distance was settled
    in the earliest sweep (so zero-cost regions never create loops, and equally cheap
    paths with fewer cells are preferred), then to the first in the order up-left, up,
    up-right, left, right, down-left, down, down-right.

    `theta` should be finite: an instance with an `inf` or `nan` entry gets an
    all-`nan` answer (as `jnp` functions propagate `nan`), which makes the loss `nan`
    rather than silently wrong.

    **Arguments:**

    - `connectivity`: `8` (default; the Warcraft convention, diagonal moves allowed)
      or `4`.

    !!! Example

        ```python
        costs = jnp.array([[1.0, 9.0, 9.0],
                           [1.0, 9.0, 9.0],
                           [9.0, 1.0, 1.0]])
        sp.GridShortestPath().argmax(-costs)
        # [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
        opt = sp.PerturbedOptimizer(sp.GridShortestPath(), noise=sp.Normal(), sigma=0.5,
                                    num_samples=20, perturbation="multiplicative")
        y_soft = opt(-costs, key=jax.random.key(0))
        ```
    """

    connectivity: int = eqx.field(default=8, static=True)
    event_ndim: ClassVar[int] = 2

    def __check_init__(self):
        if self.connectivity not in (4, 8) or isinstance(self.connectivity, bool):
            raise ValueError(
                f"GridShortestPath: `connectivity` must be 4 or 8, got {self.connectivity!r}."
            )

    def argmax_batch(self, thetas: Float[Array, "N H W"]) -> Float[Array, "N H W"]:
        if thetas.ndim != 3:
            raise ValueError(
                "GridShortestPath: one instance is a 2D grid (H, W); got instances of "
                f"shape {thetas.shape[1:]}."
            )
        if not jnp.issubdtype(thetas.dtype, jnp.floating):
            raise TypeError(
                f"GridShortestPath: `theta` must have a floating dtype, got {thetas.dtype}."
            )
        n, h, w = thetas.shape
        if n == 0:
            return jnp.zeros(thetas.shape, thetas.dtype)
        # Batch last: every shifted copy is then a contiguous block of instances.
        thetas_t = jnp.transpose(thetas, (1, 2, 0))
        finite = jnp.isfinite(thetas_t)
        costs = jnp.maximum(-thetas_t, 0)
        dist, settled = _relax(jnp.where(finite, costs, 0), self.connectivity)
        y = _backtrack(dist, settled, _OFFSETS[self.connectivity])
        # an instance with a non-finite entry gets a NaN answer (as jnp functions do)
        y = jnp.where(jnp.all(finite, axis=(0, 1), keepdims=True), y, jnp.nan)
        return jnp.transpose(y, (2, 0, 1)).astype(thetas.dtype)


def _shift(x: Array, axis: int, d: int) -> Array:
    """`out[i] = x[i + d]` along `axis`, +inf outside the grid."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    padded = jnp.pad(x, pad, constant_values=jnp.inf)
    index = [slice(None)] * x.ndim
    index[axis] = slice(1 + d, 1 + d + x.shape[axis])
    return padded[tuple(index)]


def _neighbour_min(dist: Array, connectivity: int) -> Array:
    """The minimum of `dist (H, W, N)` over each cell's neighbours and the cell itself
    (harmless: with costs >= 0 a cell never strictly improves on itself)."""
    if connectivity == 8:  # a separable 3x3 minimum
        rows = jnp.minimum(jnp.minimum(_shift(dist, 1, -1), dist), _shift(dist, 1, 1))
        return jnp.minimum(jnp.minimum(_shift(rows, 0, -1), rows), _shift(rows, 0, 1))
    vertical = jnp.minimum(_shift(dist, 0, -1), _shift(dist, 0, 1))
    horizontal = jnp.minimum(_shift(dist, 1, -1), _shift(dist, 1, 1))
    return jnp.minimum(jnp.minimum(vertical, horizontal), dist)


def _relax(costs: Array, connectivity: int) -> tuple[Array, Array]:
    """Bellman-Ford on node costs `(H, W, N)` (costs >= 0), with Jacobi sweeps.

    Returns the distances (path costs, both end cells included) and, for each cell,
    the sweep at which its distance was last improved. The loop stops once no cell
    cheaper than the target improved in a sweep (with costs >= 0 such cells can no
    longer improve the target), and after at most H * W sweeps (the Bellman-Ford
    bound), whichever comes first. Two sweeps run per loop step (half the loop-condition
    evaluations); an extra sweep only lowers cells that are not cheaper than the
    target, so the path found stays optimal and deterministic.
    """
    h, w, _ = costs.shape
    dist = jnp.full(costs.shape, jnp.inf, costs.dtype).at[0, 0].set(costs[0, 0])
    settled = jnp.zeros(costs.shape, jnp.int32)

    def sweep(carry):
        dist, settled, _, it = carry
        active = jnp.array(False)
        for _ in range(2):
            new = jnp.minimum(dist, _neighbour_min(dist, connectivity) + costs)
            # Materialise `new` once instead of letting XLA recompute it in each consumer.
            new = jax.lax.optimization_barrier(new)
            improved = new < dist
            active = active | jnp.any(improved & (new < dist[h - 1 :, w - 1 :]))
            dist, settled, it = new, jnp.where(improved, it + 1, settled), it + 1
        return dist, settled, active, it

    def cond(carry):
        _, _, active, it = carry
        return active & (it < h * w)

    init = (dist, settled, jnp.array(True), jnp.array(0, jnp.int32))
    dist, settled, _, _ = jax.lax.while_loop(cond, sweep, init)
    return dist, settled


def _backtrack(dist: Array, settled: Array, offsets) -> Array:
    """Walk back from the bottom-right cell to the top-left one; returns `y (H, W, N)`.

    Each cell's predecessor is chosen for all cells at once: the neighbour of least
    distance, then of earliest `settled` sweep, then first in `offsets` order. Along a
    step to a neighbour of equal distance (zero-cost cells) `settled` strictly
    decreases, so the walk never loops and reaches the source in fewer than H * W
    steps; each step is then a single gather.
    """
    h, w, n = dist.shape
    big = np.iinfo(np.int32).max
    ring = ((1, 1), (1, 1), (0, 0))  # a ring of cells that are never chosen
    dist = jnp.pad(dist, ring, constant_values=jnp.inf)
    settled = jnp.pad(settled, ring, constant_values=big)
    near_d = jnp.stack([dist[1 + a : 1 + a + h, 1 + b : 1 + b + w] for a, b in offsets])
    near_s = jnp.stack([settled[1 + a : 1 + a + h, 1 + b : 1 + b + w] for a, b in offsets])
    near_s = jnp.where(near_d == jnp.min(near_d, axis=0, keepdims=True), near_s, big)
    steps = jnp.asarray(np.array([a * w + b for a, b in offsets], np.int32))
    cells = jnp.arange(h * w, dtype=jnp.int32).reshape(h, w, 1)
    pred = (cells + steps[jnp.argmin(near_s, axis=0)]).reshape(h * w, n)
    source, target = 0, h * w - 1
    y = jnp.zeros((h * w, n), jnp.bool_).at[source].set(True).at[target].set(True)
    cols = jnp.arange(n)

    def body(carry):
        y, node, it = carry
        node = jnp.where(node == source, source, jnp.take_along_axis(pred, node, axis=0))
        return y.at[node[0], cols].set(True), node, it + 1

    def cond(carry):
        _, node, it = carry
        return jnp.any(node != source) & (it < h * w)

    node = jnp.full((1, n), target, jnp.int32)
    y, _, _ = jax.lax.while_loop(cond, body, (y, node, jnp.array(0, jnp.int32)))
    return y.reshape(h, w, n)
