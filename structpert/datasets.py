"""Synthetic data for shortest-path learning: PyEPO's generator and Warcraft-like maps.

Everything here is plain numpy (seeded `numpy.random.RandomState` / `default_rng`), so
the data is identical on every machine and independent of JAX.

!!! Example

    ```python
    import structpert as sp
    from structpert import datasets

    x, c = datasets.shortest_path_data(2000, 5, (5, 5), deg=4, noise_width=0.5, seed=42)
    arcs = datasets.grid_arcs((5, 5))                     # (40, 2), PyEPO's order
    solver = sp.GraphShortestPath(arcs[:, 0], arcs[:, 1], source=0, target=24)
    train, test = datasets.train_test_indices(2000, test_size=1000, seed=42)
    ```
"""

import math
from collections.abc import Sequence

import numpy as np


def _check_grid(grid, who: str) -> tuple[int, int]:
    try:
        dims: tuple = tuple(grid)
    except TypeError:
        dims = ()
    ok = len(dims) == 2 and all(
        isinstance(g, int | np.integer) and not isinstance(g, bool) and g >= 1 for g in dims
    )
    if not ok or dims[0] * dims[1] < 2:
        raise ValueError(
            f"{who}: `grid` must be a pair of positive ints (rows, cols) with at least "
            f"two cells, got {grid!r}."
        )
    return int(dims[0]), int(dims[1])


def _check_int(x, name: str, who: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer) or x < low:
        raise ValueError(f"{who}: `{name}` must be an int >= {low}, got {x!r}.")
    return int(x)


def grid_arcs(grid: tuple[int, int]) -> np.ndarray:
    """The arcs of PyEPO's shortest-path grid, in PyEPO's order.

    Nodes are numbered row by row, $v = i \\cdot \\text{cols} + j$. For each row $i$:
    first the arcs to the right $(v, v+1)$ for $j = 0, \\dots, \\text{cols}-2$, then,
    unless it is the last row, the arcs down $(v, v + \\text{cols})$ for
    $j = 0, \\dots, \\text{cols}-1$. Every arc points right or down (a DAG); paths go
    from node 0 (top-left) to the last node (bottom-right).

    **Arguments:**

    - `grid`: `(rows, cols)`.

    **Returns:** an int64 array of shape `(E, 2)` of `(tail, head)` pairs, with
    $E = (\\text{rows}-1)\\,\\text{cols} + (\\text{cols}-1)\\,\\text{rows}$ (40 on a 5x5 grid).

    !!! Example

        ```python
        arcs = datasets.grid_arcs((5, 5))
        solver = sp.GraphShortestPath(arcs[:, 0], arcs[:, 1], source=0, target=24)
        ```
    """
    rows, cols = _check_grid(grid, "grid_arcs")
    arcs = []
    for i in range(rows):
        arcs += [(i * cols + j, i * cols + j + 1) for j in range(cols - 1)]
        if i < rows - 1:
            arcs += [(i * cols + j, (i + 1) * cols + j) for j in range(cols)]
    return np.array(arcs, dtype=np.int64).reshape(-1, 2)


def shortest_path_data(
    num_data: int,
    num_features: int = 5,
    grid: tuple[int, int] = (5, 5),
    deg: int = 1,
    noise_width: float | int = 0.0,
    seed: int = 135,
) -> tuple[np.ndarray, np.ndarray]:
    """Features and arc costs, identical to PyEPO's `pyepo.data.shortestpath.genData`.

    The same random stream, in the same order (Elmachtoub & Grigas' generator): with
    `rnd = numpy.random.RandomState(seed)`, a fixed 0/1 matrix
    $B \\sim \\text{Bernoulli}(1/2)^{d \\times p}$ is drawn first, then features
    $x_i \\sim \\mathcal{N}(0, I_p)$, then multiplicative noise
    $\\epsilon_{ij} \\sim U[1 - \\bar\\epsilon, 1 + \\bar\\epsilon]$, and

    $$c_{ij} = \\frac{\\big((B x_i)_j/\\sqrt{p} + 3\\big)^{\\text{deg}} + 1}{3.5^{\\text{deg}}}
    \\,\\epsilon_{ij}.$$

    Costs are positive (for `noise_width < 1`); a higher `deg` makes them a more
    nonlinear function of the features, where decision-focused training pays off.

    **Arguments:**

    - `num_data`: the number $n$ of samples.
    - `num_features`: the feature dimension $p$.
    - `grid`: `(rows, cols)` of the grid; the arcs are [`structpert.datasets.grid_arcs`][].
    - `deg`: the polynomial degree, a positive int.
    - `noise_width`: the half-width $\\bar\\epsilon \\ge 0$ of the noise.
    - `seed`: the seed of `numpy.random.RandomState` (PyEPO's default is 135).

    **Returns:** `(x, c)`: features, float64 of shape `(n, p)`, and costs, float32 of
    shape `(n, d)` with one column per arc (as PyEPO).

    !!! Example

        ```python
        x, c = datasets.shortest_path_data(2000, 5, (5, 5), deg=4, noise_width=0.5, seed=42)
        c[0, :3]  # [0.3539176, 1.0785899, 1.0139644]
        ```
    """
    who = "shortest_path_data"
    n = _check_int(num_data, "num_data", who, 1)
    p = _check_int(num_features, "num_features", who, 1)
    deg = _check_int(deg, "deg", who, 1)
    rows, cols = _check_grid(grid, who)
    if not isinstance(noise_width, int | float | np.floating) or not noise_width >= 0:
        raise ValueError(f"{who}: `noise_width` must be a float >= 0, got {noise_width!r}.")
    rnd = np.random.RandomState(seed)
    d = (rows - 1) * cols + (cols - 1) * rows
    b = rnd.binomial(1, 0.5, (d, p))
    x = rnd.normal(0, 1, (n, p))
    c = (x @ b.T / np.sqrt(p) + 3) ** deg + 1
    c /= 3.5**deg
    c *= rnd.uniform(1 - noise_width, 1 + noise_width, (n, d))
    return x, c.astype(np.float32)


def train_test_indices(
    num_data: int, test_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test indices, the same as scikit-learn's
    `train_test_split(..., test_size=test_size, random_state=seed)`.

    Both draw one permutation of `range(num_data)` with
    `numpy.random.RandomState(seed)`; its first `n_test` entries are the test set and
    the rest the training set, so `x[train], x[test]` reproduces the split of the
    PyEPO notebooks without scikit-learn.

    **Arguments:**

    - `num_data`: the number of samples.
    - `test_size`: an int (how many test samples) or a float in (0, 1) (a fraction,
      rounded up).
    - `seed`: the seed (`random_state`).

    **Returns:** `(train, test)`, two int arrays of indices.

    !!! Example

        ```python
        train, test = datasets.train_test_indices(2000, test_size=1000, seed=42)
        x_train, x_test = x[train], x[test]
        ```
    """
    who = "train_test_indices"
    n = _check_int(num_data, "num_data", who, 2)
    if isinstance(test_size, float | np.floating) and 0 < test_size < 1:
        n_test = math.ceil(test_size * n)
    elif isinstance(test_size, int | np.integer) and not isinstance(test_size, bool):
        n_test = int(test_size)
    else:
        n_test = -1
    if not 0 < n_test < n:
        raise ValueError(
            f"{who}: `test_size` must be an int in [1, {n - 1}] or a float in (0, 1) "
            f"leaving both sets non-empty, got {test_size!r}."
        )
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


# Terrain costs of the default Warcraft-like maps: cheap ground to costly obstacles.
WARCRAFT_COSTS = (0.8, 1.2, 5.3, 7.7, 9.2)


def warcraft_maps(
    num_maps: int,
    shape: tuple[int, int] = (12, 12),
    *,
    costs: Sequence[float] = WARCRAFT_COSTS,
    smoothness: float | int = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Random Warcraft-like cost maps: patches of a few terrain types on an H x W grid.

    The Warcraft shortest-path benchmark (Vlastelica et al. 2020; Berthet et al.
    2020) uses images whose cells have one of a few terrain costs; the images cannot
    be downloaded here, so this generator makes maps with the same geometry and cost
    structure, for solver speed and exactness tests and for learning demos. Each map
    is a smoothed Gaussian random field cut at its quantiles into `len(costs)`
    terrain types of roughly equal area, so neighbouring cells tend to share a type;
    types are ordered like elevation, lowest (cheapest) first.

    **Arguments:**

    - `num_maps`: how many maps.
    - `shape`: `(H, W)`, e.g. `(12, 12)` ... `(30, 30)` as in the benchmark.
    - `costs`: the cost of each terrain type (positive), default
      `(0.8, 1.2, 5.3, 7.7, 9.2)`.
    - `smoothness`: the length scale of the patches, in cells (0 gives independent
      cells).
    - `seed`: the seed of `numpy.random.default_rng`.

    **Returns:** float32 costs of shape `(num_maps, H, W)`; for
    [`structpert.GridShortestPath`][] pass `theta = -costs`.

    !!! Example

        ```python
        costs = datasets.warcraft_maps(1000, (12, 12), seed=0)
        y = jax.vmap(sp.GridShortestPath().argmax)(-jnp.asarray(costs))
        ```
    """
    who = "warcraft_maps"
    num = _check_int(num_maps, "num_maps", who, 1)
    h, w = _check_grid(shape, who)
    levels = np.asarray(costs, dtype=np.float64)
    if levels.ndim != 1 or levels.size < 1 or not np.all(levels > 0):
        raise ValueError(f"{who}: `costs` must be a non-empty list of positive floats.")
    if not isinstance(smoothness, int | float) or smoothness < 0:
        raise ValueError(f"{who}: `smoothness` must be a float >= 0, got {smoothness!r}.")
    rng = np.random.default_rng(seed)
    field = rng.standard_normal((num, h, w))
    if smoothness > 0:
        field = _gaussian_blur(field, smoothness)
    # cut each map at its own quantiles: equal areas of every terrain type
    qs = np.quantile(field, np.linspace(0, 1, levels.size + 1)[1:-1], axis=(1, 2))
    kind = (field[None] > qs.reshape(-1, num, 1, 1)).sum(0)
    return levels[kind].astype(np.float32)


def _gaussian_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the last two axes, with reflected borders."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(field, pad, mode="reflect")
        out = np.zeros_like(field)
        for k, t in enumerate(taps):
            index = [slice(None)] * 3
            index[axis] = slice(k, k + field.shape[axis])
            out += t * padded[tuple(index)]
        field = out
    return field
