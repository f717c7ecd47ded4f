"""GridShortestPath and GraphShortestPath: exact against scipy / networkx, valid paths,
negative costs, ties, errors, and use inside the layer.

Thousands of random instances are solved in a few batched calls (one compilation
per grid shape or graph), then checked against per-instance references.
"""

import itertools

import jax
import jax.numpy as jnp
import jaxtyping
import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sparse
from scipy.ndimage import label
from scipy.sparse.csgraph import dijkstra

import structpert as sp
from structpert import datasets


BAD_INPUT = (ValueError, TypeError, jaxtyping.TypeCheckError)
OFFSETS = {
    8: [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if a or b],
    4: [(-1, 0), (0, -1), (0, 1), (1, 0)],
}


# ---------------------------------------------------------------------------------
# Grid references and checks


def grid_reference(costs, connectivity):
    """Optimal path costs (node costs, both ends counted) with scipy's Dijkstra."""
    n, h, w = costs.shape
    tails, heads = [], []
    for i, j in itertools.product(range(h), range(w)):
        for di, dj in OFFSETS[connectivity]:
            if 0 <= i + di < h and 0 <= j + dj < w:
                tails.append(i * w + j)
                heads.append((i + di) * w + j + dj)
    tails, heads = np.array(tails), np.array(heads)
    out = np.empty(n)
    for k in range(n):
        flat = costs[k].ravel()
        # explicit zeros are edges for scipy's csgraph (checked by the all-zero grids)
        graph = sparse.csr_matrix((flat[heads], (tails, heads)), shape=(h * w, h * w))
        out[k] = dijkstra(graph, indices=0)[h * w - 1] + flat[0]
    return out


def assert_grid_paths(y, connectivity):
    """0/1, both corners on, and one connected set of cells."""
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert np.all(y[:, 0, 0] == 1) and np.all(y[:, -1, -1] == 1)
    structure = np.ones((3, 3)) if connectivity == 8 else None
    assert all(label(yk, structure=structure)[1] == 1 for yk in y)  # pyright: ignore


def random_grids(rng, n, h, w):
    """A mix: uniform costs, small integers (ties and zeros), Warcraft-like maps."""
    k = n // 3
    return np.concatenate(
        [
            rng.uniform(0.0, 10.0, (k, h, w)),
            rng.integers(0, 3, (k, h, w)).astype(float),
            datasets.warcraft_maps(n - 2 * k, (h, w), seed=int(rng.integers(1000))),
        ]
    )


SHAPES = [(2, 2), (7, 19), (30, 30)]


@pytest.mark.parametrize("connectivity", [8, 4])
def test_grid_is_exact_on_thousands_of_grids(connectivity):
    rng = np.random.default_rng(connectivity)
    solver = jax.jit(sp.GridShortestPath(connectivity).argmax_batch)
    total = 0
    for h, w in SHAPES:
        costs = random_grids(rng, 150 if h * w > 400 else 600, h, w)
        y = np.asarray(solver(jnp.asarray(-costs)))
        assert_grid_paths(y, connectivity)
        got = np.sum(y * costs, axis=(1, 2))
        np.testing.assert_allclose(got, grid_reference(costs, connectivity), rtol=1e-12, atol=1e-12)
        total += len(costs)
    assert total > 1000


@pytest.mark.parametrize("connectivity", [8, 4])
def test_grid_zero_costs_give_the_fewest_cells(connectivity):
    # All paths cost 0; the documented tie-break (earliest settled neighbour) then
    # gives a path with the fewest cells: max(H, W) with diagonals, H + W - 1 without.
    theta = jnp.zeros((3, 6, 9)).at[1, 2:4, :8].set(-1.0).at[2].set(-1.0)
    y = np.asarray(jax.jit(sp.GridShortestPath(connectivity).argmax_batch)(theta))
    assert_grid_paths(y, connectivity)
    assert y[0].sum() == (9 if connectivity == 8 else 14)
    assert np.sum(y[1, 2:4, :8]) == 0  # goes around the costly band, at zero cost
    assert y[2].sum() == (9 if connectivity == 8 else 14)  # all costs equal


def test_grid_known_answer_and_one_cell():
    costs = jnp.array([[1.0, 9.0, 9.0], [1.0, 9.5, 9.0], [9.0, 1.0, 1.0]])
    expected = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 1]])
    np.testing.assert_array_equal(jax.jit(sp.GridShortestPath().argmax)(-costs), expected)
    expected4 = np.array([[1, 0, 0], [1, 0, 0], [1, 1, 1]])
    np.testing.assert_array_equal(jax.jit(sp.GridShortestPath(4).argmax)(-costs), expected4)
    one_cell = jax.jit(sp.GridShortestPath().argmax)(jnp.array([[-3.0]]))
    np.testing.assert_array_equal(one_cell, [[1.0]])


def test_grid_negative_costs_are_treated_as_zero():
    # theta > 0 (negative costs, e.g. after additive noise) = zero cost: a valid path,
    # the optimal one for max(cost, 0), never a hang.
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(0.0, 1.0, (200, 9, 11)))
    for connectivity in (8, 4):
        solver = jax.jit(sp.GridShortestPath(connectivity).argmax_batch)
        y = np.asarray(solver(theta))
        assert_grid_paths(y, connectivity)
        np.testing.assert_array_equal(y, solver(jnp.minimum(theta, 0.0)))
        clipped = np.maximum(-np.asarray(theta), 0.0)
        np.testing.assert_allclose(
            np.sum(y * clipped, axis=(1, 2)), grid_reference(clipped, connectivity), atol=1e-12
        )


def test_grid_is_batch_independent_and_float32():
    rng = np.random.default_rng(1)
    costs = datasets.warcraft_maps(40, (6, 7), seed=3)
    costs[:10] = rng.integers(0, 2, (10, 6, 7))  # ties
    theta = -jnp.asarray(costs, jnp.float32)
    solver = sp.GridShortestPath()
    batched = np.asarray(jax.jit(solver.argmax_batch)(theta))
    assert batched.dtype == np.float32
    assert_grid_paths(batched, 8)
    np.testing.assert_allclose(np.sum(batched * costs, (1, 2)), grid_reference(costs, 8), rtol=1e-6)
    # one instance at a time (vmap of the single-instance argmax) gives the same paths
    np.testing.assert_array_equal(batched, jax.vmap(solver.argmax)(theta))


def test_grid_non_finite_theta_gives_nan():
    theta = -jnp.ones((2, 4, 4)).at[1, 2, 2].set(jnp.nan)
    y = np.asarray(jax.jit(sp.GridShortestPath().argmax_batch)(theta))
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all() and y[0].sum() == 4


def test_grid_errors_and_registry():
    for bad in (6, 0, True, "8"):
        with pytest.raises(BAD_INPUT):
            sp.GridShortestPath(bad)
    with pytest.raises(BAD_INPUT):
        sp.GridShortestPath().argmax_batch(jnp.ones((2, 3)))
    with pytest.raises(BAD_INPUT):
        sp.GridShortestPath().argmax_batch(jnp.ones((2, 3, 3), jnp.int32))
    assert sp.make_solver("grid_shortest_path", connectivity=4) == sp.GridShortestPath(4)


def test_grid_inside_the_layer():
    # Additive noise makes some costs negative (treated as zero): still valid paths.
    costs = jnp.asarray(datasets.warcraft_maps(4, (8, 8), seed=0))
    y_true = jax.jit(sp.GridShortestPath().argmax_batch)(-costs)
    opt = sp.PerturbedOptimizer(sp.GridShortestPath(), noise=sp.Normal(), sigma=2.0)
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(1)

    # the gradient is y_eps - y_true: recover y_eps and check it is a soft path
    grad = jax.jit(jax.grad(lambda t: loss(t, y_true, key=key).sum()))(-costs)
    y_eps = np.asarray(grad + y_true)
    assert y_eps.shape == costs.shape
    assert np.all((y_eps > -1e-6) & (y_eps < 1 + 1e-6))
    np.testing.assert_allclose(y_eps[:, 0, 0], 1.0)
    np.testing.assert_allclose(y_eps[:, -1, -1], 1.0)
    # soft but informative: some cells are uncertain, the path mass stays near y_true
    assert 0 < np.mean((y_eps > 0.01) & (y_eps < 0.99))
    assert np.mean(np.abs(y_eps - np.asarray(y_true))) < 0.25


# ---------------------------------------------------------------------------------
# Graph references and checks


def assert_edge_paths(y, senders, receivers, source, target):
    """Each row of y (0/1 over edges) is a simple path from source to target."""
    assert set(np.unique(y)) <= {0.0, 1.0}
    for row in y:
        succ = {}
        for e in np.flatnonzero(row):
            assert senders[e] not in succ, "two edges leave the same node"
            succ[senders[e]] = receivers[e]
        node, seen = source, {source}
        for _ in range(len(succ)):
            node = succ[node]
            assert node not in seen, "the path repeats a node"
            seen.add(node)
        assert node == target


def graph_reference(costs, senders, receivers, source, target):
    """Optimal path costs with networkx (Bellman-Ford: negative costs allowed)."""
    out = np.empty(len(costs))
    for k, c in enumerate(costs):
        g = nx.MultiDiGraph()
        g.add_weighted_edges_from(zip(senders.tolist(), receivers.tolist(), c.tolist()))
        out[k] = nx.bellman_ford_path_length(g, source, target)
    return out


def random_graph(rng, num_nodes, num_edges, dag):
    s = rng.integers(0, num_nodes, num_edges)
    r = rng.integers(0, num_nodes, num_edges)
    if dag:
        s, r = np.minimum(s, r), np.maximum(s, r)
        s, r = s[s != r], r[s != r]
    chain = np.sort(rng.choice(np.arange(1, num_nodes - 1), 2, replace=False))
    nodes = [0, *chain, num_nodes - 1]  # make sure the target is reachable
    return np.concatenate([s, nodes[:-1]]), np.concatenate([r, nodes[1:]])


def random_costs(rng, n, e, signed):
    k = n // 3
    parts = [rng.uniform(0.0, 5.0, (k, e)), rng.integers(0, 3, (k, e)).astype(float)]
    last = rng.normal(0.5, 1.0, (n - 2 * k, e)) if signed else rng.exponential(1.0, (n - 2 * k, e))
    return np.concatenate(parts + [last])


@pytest.mark.parametrize("dag", [True, False])
def test_graph_is_exact_on_random_graphs(dag):
    rng = np.random.default_rng(10 + dag)
    methods = set()
    for num_nodes, num_edges in [(6, 14), (40, 400)]:
        senders, receivers = random_graph(rng, num_nodes, num_edges, dag)
        solver = sp.GraphShortestPath(senders, receivers, 0, num_nodes - 1, num_nodes=num_nodes)
        assert solver.is_dag == dag
        methods.add(solver._plan.method)
        # DAGs are exact for costs of any sign; general graphs for costs >= 0
        costs = random_costs(rng, 400, len(senders), signed=dag)
        y = np.asarray(jax.jit(solver.argmax_batch)(jnp.asarray(-costs)))
        assert_edge_paths(y, senders, receivers, 0, num_nodes - 1)
        want = graph_reference(costs, senders, receivers, 0, num_nodes - 1)
        np.testing.assert_allclose(np.sum(y * costs, axis=1), want, atol=1e-12)
    # both DAG algorithms (listing the paths, dynamic programming) are exercised
    assert methods == ({"enumeration", "dag"} if dag else {"bellman_ford"})


def test_graph_cycles_with_negative_costs_are_clipped():
    rng = np.random.default_rng(3)
    senders, receivers = random_graph(rng, 20, 80, dag=False)
    senders = np.concatenate([senders, [5, 6]])  # a 2-cycle: negative costs make it
    receivers = np.concatenate([receivers, [6, 5]])  # a negative cycle
    solver = sp.GraphShortestPath(senders, receivers, 0, 19)
    assert not solver.is_dag
    theta = jnp.asarray(rng.normal(0.0, 1.0, (200, len(senders))))
    solve = jax.jit(solver.argmax_batch)
    y = np.asarray(solve(theta))
    assert_edge_paths(y, senders, receivers, 0, 19)
    np.testing.assert_array_equal(y, solve(jnp.minimum(theta, 0.0)))
    clipped = np.maximum(-np.asarray(theta), 0.0)
    want = graph_reference(clipped, senders, receivers, 0, 19)
    np.testing.assert_allclose(np.sum(y * clipped, axis=1), want, atol=1e-12)


def test_pyepo_grid_matches_brute_force_with_ties():
    arcs = datasets.grid_arcs((4, 4))
    solver = sp.GraphShortestPath(arcs[:, 0], arcs[:, 1], source=0, target=15)
    assert solver.is_dag and len(arcs) == 24
    # the 20 monotone paths of a 4x4 grid, as edge indicators
    index = {tuple(a): e for e, a in enumerate(arcs.tolist())}
    paths = []
    for moves in set(itertools.permutations("RRRDDD")):
        y, v = np.zeros(len(arcs)), 0
        for m in moves:
            u, v = v, v + (1 if m == "R" else 4)
            y[index[(u, v)]] = 1
        paths.append(y)
    paths = np.array(paths)
    assert len(paths) == 20
    rng = np.random.default_rng(0)
    costs = np.concatenate([rng.normal(size=(300, 24)), rng.integers(0, 2, (300, 24))])
    y = np.asarray(jax.jit(solver.argmax_batch)(jnp.asarray(-costs)))
    assert (y[:, None, :] == paths[None]).all(axis=2).sum(axis=1).tolist() == [1] * 600
    np.testing.assert_allclose(np.sum(y * costs, axis=1), (costs @ paths.T).min(axis=1))


def test_large_pyepo_grid_uses_the_dynamic_programme():
    arcs = datasets.grid_arcs((9, 9))  # 12870 paths: too many to list
    solver = sp.GraphShortestPath(arcs[:, 0], arcs[:, 1], source=0, target=80)
    assert solver._plan.method == "dag"
    rng = np.random.default_rng(5)
    costs = np.concatenate(
        [rng.integers(-1, 2, (100, len(arcs))), rng.normal(size=(100, len(arcs)))]
    )
    y = np.asarray(jax.jit(solver.argmax_batch)(jnp.asarray(-costs)))
    assert_edge_paths(y, arcs[:, 0], arcs[:, 1], 0, 80)
    want = graph_reference(costs, arcs[:, 0], arcs[:, 1], 0, 80)
    np.testing.assert_allclose(np.sum(y * costs, axis=1), want, atol=1e-12)


def test_graph_edges_off_every_path_stay_zero_and_parallel_edges():
    # 0 -> 1 -> 2 (target) with a parallel edge 0 -> 1, an edge out of the target,
    # and edges from an unreachable node into the source and into the target.
    senders = [0, 1, 0, 2, 4, 4]
    receivers = [1, 2, 1, 3, 0, 2]
    solver = sp.GraphShortestPath(senders, receivers, source=0, target=2)
    theta = jnp.array([[-1.0, -1.0, -0.5, 100.0, 100.0, 100.0], [-1.0, -1.0, -1.0, 5, 5, 5]])
    y = jax.jit(solver.argmax_batch)(theta)
    np.testing.assert_array_equal(y, [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    assert solver.is_dag and solver.num_nodes == 5


def test_graph_solver_is_static_configuration():
    arcs = datasets.grid_arcs((3, 3))
    a = sp.GraphShortestPath(arcs[:, 0], arcs[:, 1], 0, 8)
    b = sp.make_solver(
        "graph_shortest_path", senders=list(arcs[:, 0]), receivers=arcs[:, 1], source=0, target=8
    )
    assert a == b and hash(a) == hash(b)
    assert jax.tree_util.tree_leaves(a) == []
    np.testing.assert_array_equal(a.senders, arcs[:, 0])
    with pytest.raises(ValueError):
        a.senders[0] = 3  # read-only
    costs = np.arange(1.0, 13.0)
    y = np.asarray(jax.jit(a.argmax)(-jnp.asarray(costs)))  # a jit of a bound method
    assert_edge_paths(y[None], arcs[:, 0], arcs[:, 1], 0, 8)
    assert y @ costs == graph_reference(costs[None], arcs[:, 0], arcs[:, 1], 0, 8)[0]


def test_graph_non_finite_theta_gives_nan():
    solver = sp.GraphShortestPath([0, 1, 0], [1, 2, 2], 0, 2)
    theta = jnp.array([[-1.0, -1.0, -5.0], [-1.0, jnp.inf, -5.0]])
    y = np.asarray(jax.jit(solver.argmax_batch)(theta))
    np.testing.assert_array_equal(y[0], [1, 1, 0])
    assert np.isnan(y[1]).all()


def test_graph_errors():
    with pytest.raises(ValueError, match="not reachable"):
        sp.GraphShortestPath([0, 2], [1, 1], source=0, target=2)
    with pytest.raises(ValueError, match="not reachable"):
        sp.GraphShortestPath([0, 1], [1, 2], source=0, target=3, num_nodes=4)
    bad_graphs = [
        dict(senders=[0, 1], receivers=[1]),
        dict(senders=[0.0, 1.0], receivers=[1, 2]),
        dict(senders=[[0, 1]], receivers=[[1, 2]]),
        dict(senders=[], receivers=[]),
        dict(senders=[-1, 1], receivers=[1, 2]),
        dict(senders=[0, 1], receivers=[1, 2], num_nodes=2),
        dict(senders=[0, 1], receivers=[1, 2], source=2, target=2),
        dict(senders=[0, 1], receivers=[1, 2], source=0, target=7),
        dict(senders=[0, 1], receivers=[1, 2], source=0.0),
    ]
    for kwargs in bad_graphs:
        kwargs = {"source": 0, "target": 2} | kwargs
        with pytest.raises(BAD_INPUT):
            sp.GraphShortestPath(**kwargs)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda s: sp.GraphShortestPath(s, jnp.array([1, 2]), 0, 2))(jnp.array([0, 1]))
    solver = sp.GraphShortestPath([0, 1], [1, 2], 0, 2)
    with pytest.raises(BAD_INPUT):
        solver.argmax_batch(jnp.ones((3, 5)))
    with pytest.raises(BAD_INPUT):
        sp.PerturbedOptimizer(solver)(jnp.ones(3), key=jax.random.key(0))
