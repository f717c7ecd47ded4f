"""Shortest paths in an edge-weighted directed graph, batched in JAX."""

import hashlib
from collections import deque
from typing import ClassVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .base import AbstractBatchedSolver, register_solver


class _Plan:
    """Everything `argmax_batch` needs about the graph, computed once with numpy.

    A static (hashable) field: two plans of the same graph compare equal, so `jit`
    caches are shared, and the solver has no array leaves (like every solver, it is
    pure configuration: `jax.jit(solver.argmax)` works). Only the *relevant* part of
    the graph is kept: the nodes that are reachable from the source and can reach the
    target, and the edges between them (no other edge can lie on a path from the
    source to the target).
    """

    def __init__(self, senders, receivers, source, target, num_nodes):
        num_edges = len(senders)
        self.edge_senders = senders.copy()
        self.edge_receivers = receivers.copy()
        self.edge_senders.flags.writeable = False
        self.edge_receivers.flags.writeable = False
        out_adj = [[] for _ in range(num_nodes)]
        in_adj = [[] for _ in range(num_nodes)]
        for e, (u, v) in enumerate(zip(senders.tolist(), receivers.tolist())):
            out_adj[u].append(e)
            in_adj[v].append(e)
        forward = _reach(source, out_adj, receivers, num_nodes)
        if not forward[target]:
            raise ValueError(
                f"GraphShortestPath: `target` {target} is not reachable from `source` "
                f"{source} along the directed edges senders -> receivers; add a path "
                "or check the edge direction."
            )
        backward = _reach(target, in_adj, senders, num_nodes)
        nodes = forward & backward
        edges = nodes[senders] & nodes[receivers]
        self.num_nodes = num_nodes
        self.num_edges = num_edges
        self.source = source
        self.target = target
        self.num_relevant = int(nodes.sum())
        # incoming relevant edges of every node, padded with the dummy edge `num_edges`
        incoming = [[e for e in in_adj[v] if edges[e]] for v in range(num_nodes)]
        incoming.append([])  # the dummy node `num_nodes`, never reached
        width = max(1, max(len(inc) for inc in incoming))
        table = np.full((num_nodes + 1, width), num_edges, np.int32)
        for v, inc in enumerate(incoming):
            table[v, : len(inc)] = inc
        self.incoming = table
        # senders of the edges plus the dummy edge, which starts at the dummy node
        self.senders = np.append(senders, num_nodes).astype(np.int32)
        self.levels = _levels(source, nodes, edges, senders, receivers, out_adj)
        self.is_dag = self.levels is not None
        if self.levels is not None:
            # the nodes of each level (padded with the dummy node), level 0 = source
            groups = [np.flatnonzero(self.levels == k) for k in range(1, self.levels.max() + 1)]
            size = max(len(g) for g in groups) if groups else 1
            padded = np.full((max(len(groups), 1), size), num_nodes, np.int32)
            for k, g in enumerate(groups):
                padded[k, : len(g)] = g
            self.level_nodes = padded
        # small DAGs (e.g. PyEPO's 5x5 grid: 70 paths): list every path once, then
        # solving is one matrix product and an argmax (fast to run and to compile)
        self.paths = _enumerate_paths(source, target, edges, receivers, out_adj, self.levels)
        if self.paths is not None:
            self.method = "enumeration"
        else:
            self.method = "dag" if self.is_dag else "bellman_ford"
        digest = hashlib.sha256()
        for a in (senders, receivers):
            digest.update(np.ascontiguousarray(a, np.int64).tobytes())
        self._key = (digest.hexdigest(), num_nodes, source, target)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Plan) and self._key == other._key

    def __repr__(self):
        kind = "DAG" if self.is_dag else "general"
        return (
            f"<{kind} graph: {self.num_nodes} nodes, {self.num_edges} edges, "
            f"method {self.method!r}>"
        )


def _reach(start, adjacency, heads, num_nodes):
    """Boolean mask of the nodes reachable from `start` (breadth-first search)."""
    seen = np.zeros(num_nodes, bool)
    seen[start] = True
    queue = deque([start])
    while queue:
        u = queue.popleft()
        for e in adjacency[u]:
            v = int(heads[e])
            if not seen[v]:
                seen[v] = True
                queue.append(v)
    return seen


def _levels(source, nodes, edges, senders, receivers, out_adj):
    """Longest-path level of each relevant node (-1 elsewhere), or None if the
    relevant subgraph has a cycle (Kahn's algorithm)."""
    num_nodes = len(nodes)
    indegree = np.bincount(receivers[edges], minlength=num_nodes)
    level = np.full(num_nodes, -1, np.int64)
    queue = deque([int(v) for v in np.flatnonzero(nodes) if indegree[v] == 0])
    if list(queue) != [source]:
        return None
    level[source] = 0
    done = 0
    while queue:
        u = queue.popleft()
        done += 1
        for e in out_adj[u]:
            if not edges[e]:
                continue
            v = int(receivers[e])
            level[v] = max(level[v], level[u] + 1)
            indegree[v] -= 1
            if indegree[v] == 0:
                queue.append(v)
    return level if done == int(nodes.sum()) else None


MAX_ENUMERATED_PATHS = 4096


def _enumerate_paths(source, target, edges, receivers, out_adj, levels):
    """The 0/1 edge indicators `(P, E)` of every source-target path of a DAG, in
    depth-first order over edges by increasing index, or None if the graph has cycles
    or more than `MAX_ENUMERATED_PATHS` paths."""
    if levels is None:
        return None
    # count the paths to the target from every node, in decreasing level order
    count = np.zeros(len(levels), dtype=object)
    count[target] = 1
    for u in sorted(np.flatnonzero(levels >= 0), key=lambda v: -levels[v]):
        if u != target:
            count[u] = sum(count[receivers[e]] for e in out_adj[u] if edges[e])
    if count[source] > MAX_ENUMERATED_PATHS:
        return None
    paths = np.zeros((int(count[source]), len(edges)), np.uint8)
    row = 0
    stack = [(source, [])]
    while stack:
        u, used = stack.pop()
        if u == target:
            paths[row, used] = 1
            row += 1
            continue
        # push in reverse so that lower edge indices are explored first
        for e in reversed([e for e in out_adj[u] if edges[e]]):
            stack.append((int(receivers[e]), used + [e]))
    return paths


def _as_index_array(x, name: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"GraphShortestPath: `{name}` must be a concrete array (numpy, a list or a "
            "JAX array outside jit); build the solver outside traced code."
        )
    arr = np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"GraphShortestPath: `{name}` must be a 1D array of integer node ids, got "
            f"shape {arr.shape} and dtype {arr.dtype}."
        )
    return arr.astype(np.int64)


def _as_node(x, name: str, num_nodes: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise TypeError(f"GraphShortestPath: `{name}` must be an int node id, got {x!r}.")
    if not 0 <= int(x) < num_nodes:
        raise ValueError(f"GraphShortestPath: `{name}`={x} is not a node id in [0, {num_nodes}).")
    return int(x)


@register_solver("graph_shortest_path")
class GraphShortestPath(AbstractBatchedSolver):
    """The cheapest path from `source` to `target` in a directed graph with edge costs.

    The graph has edges `senders[e] -> receivers[e]`, `e = 0 .. E-1` (parallel edges
    and any node ids allowed). `theta` of shape `(E,)` is **minus** the edge costs;
    `y` of shape `(E,)` is the 0/1 indicator of the edges of an optimal path:

    $$y^*(\\theta) = \\arg\\max_{y \\in \\mathcal{P}} \\langle y, \\theta\\rangle
    = \\arg\\min_{y \\in \\mathcal{P}} \\sum_e c_e y_e, \\qquad c = -\\theta,$$

    over the indicators $\\mathcal{P}$ of simple paths from `source` to `target`.

    The graph is analysed once, with numpy, when the solver is built: edges that lie
    on no path from `source` to `target` are dropped (their `y` is always 0), and a
    target that cannot be reached raises a `ValueError`.

    - **DAGs** (e.g. PyEPO's grid with right/down arcs, see
      [`structpert.datasets.grid_arcs`][]): exact for costs of **any sign** (a DAG has
      no cycles). With at most 4096 paths (PyEPO's 5x5 grid has 70) every path is
      listed once and solving is one matrix product and an argmin, quick to run and to
      compile; larger DAGs use dynamic programming over the topological levels.
    - **Graphs with cycles**: Bellman-Ford, at most one sweep per relevant node, which
      stops as soon as nothing cheaper than the target changes; exact for costs
      $\\ge 0$. Negative costs can create negative cycles, for which no cheapest path
      exists (and the cheapest *simple* path is NP-hard), so negative costs are
      treated as zero: the solver returns the optimal path for $\\max(c, 0)$. Prefer
      the multiplicative perturbation (`PerturbedOptimizer(...,
      perturbation="multiplicative")`), which keeps every cost positive.

    Every loop is bounded and the result is always a simple path from `source` to
    `target`. The whole batch runs as one kernel. Ties are broken deterministically
    (the same `theta` gives the same path, for any batch size): listed paths in
    depth-first order over edges of increasing index, the dynamic programme towards
    the incoming edge of lowest index, Bellman-Ford towards the edge that first
    strictly improved a node's distance. `theta` should be
    finite: an instance with an `inf` or `nan` entry gets an all-`nan` answer (as `jnp`
    functions propagate `nan`), which makes a loss `nan` rather than silently wrong.

    **Arguments:**

    - `senders`, `receivers`: integer arrays of shape `(E,)`, the tails and heads of
      the edges. They must be concrete (not traced).
    - `source`, `target`: distinct node ids.
    - `num_nodes`: optional; defaults to one more than the largest node id.

    !!! Example

        ```python
        # 0 -> 1 -> 3 and 0 -> 2 -> 3
        solver = sp.GraphShortestPath([0, 1, 0, 2], [1, 3, 2, 3], source=0, target=3)
        costs = jnp.array([1.0, 1.0, 0.5, 2.0])
        solver.argmax(-costs)  # [1., 1., 0., 0.]
        ```
    """

    source: int = eqx.field(static=True)
    target: int = eqx.field(static=True)
    num_nodes: int = eqx.field(static=True)
    _plan: _Plan = eqx.field(static=True)
    event_ndim: ClassVar[int] = 1

    def __init__(self, senders, receivers, source: int, target: int, num_nodes=None):
        senders = _as_index_array(senders, "senders")
        receivers = _as_index_array(receivers, "receivers")
        if senders.shape != receivers.shape:
            raise ValueError(
                f"GraphShortestPath: `senders` and `receivers` must have the same length "
                f"(one entry per edge), got {senders.shape[0]} and {receivers.shape[0]}."
            )
        if senders.size == 0:
            raise ValueError("GraphShortestPath: the graph needs at least one edge.")
        if min(senders.min(), receivers.min()) < 0:
            raise ValueError("GraphShortestPath: node ids must be >= 0.")
        largest = int(max(senders.max(), receivers.max()))
        if num_nodes is None:
            for x in (source, target):
                if isinstance(x, int | np.integer) and not isinstance(x, bool):
                    largest = max(largest, int(x))
            num_nodes = largest + 1
        if isinstance(num_nodes, bool) or not isinstance(num_nodes, int | np.integer):
            raise TypeError(f"GraphShortestPath: `num_nodes` must be an int, got {num_nodes!r}.")
        if num_nodes <= largest:
            raise ValueError(
                f"GraphShortestPath: `num_nodes`={num_nodes} but the edges use node id "
                f"{largest}; pass num_nodes > {largest} or leave it out."
            )
        source = _as_node(source, "source", int(num_nodes))
        target = _as_node(target, "target", int(num_nodes))
        if source == target:
            raise ValueError(
                "GraphShortestPath: `source` and `target` must differ (the path from a "
                "node to itself has no edges)."
            )
        self.source = source
        self.target = target
        self.num_nodes = int(num_nodes)
        self._plan = _Plan(senders, receivers, source, target, int(num_nodes))

    @property
    def senders(self) -> np.ndarray:
        """The tail of each edge, a read-only integer array of shape `(E,)`."""
        return self._plan.edge_senders

    @property
    def receivers(self) -> np.ndarray:
        """The head of each edge, a read-only integer array of shape `(E,)`."""
        return self._plan.edge_receivers

    @property
    def is_dag(self) -> bool:
        """Whether the relevant part of the graph is acyclic (then the solver is exact
        for costs of any sign)."""
        return self._plan.is_dag

    def argmax_batch(self, thetas: Float[Array, "N E"]) -> Float[Array, "N E"]:
        plan = self._plan
        if thetas.ndim != 2 or thetas.shape[1] != plan.num_edges:
            raise ValueError(
                f"GraphShortestPath: `theta` must have one entry per edge, shape "
                f"({plan.num_edges},); got instances of shape {thetas.shape[1:]}."
            )
        if not jnp.issubdtype(thetas.dtype, jnp.floating):
            raise TypeError(
                f"GraphShortestPath: `theta` must have a floating dtype, got {thetas.dtype}."
            )
        n = thetas.shape[0]
        if n == 0:
            return jnp.zeros(thetas.shape, thetas.dtype)
        finite = jnp.isfinite(thetas)
        costs = -thetas if plan.is_dag else jnp.maximum(-thetas, 0)
        costs = jnp.where(finite, costs, 0)
        if plan.method == "enumeration":
            y = _best_listed_path(plan, costs)
        else:
            # the dummy edge (index E) has infinite cost
            costs = jnp.concatenate([costs, jnp.full((n, 1), jnp.inf, costs.dtype)], axis=1)
            if plan.method == "dag":
                pred, max_steps = _dag_dp(plan, costs), plan.level_nodes.shape[0]
            else:
                pred, max_steps = _bellman_ford(plan, costs), plan.num_relevant - 1
            y = _backtrack(plan, pred, max_steps)[:, : plan.num_edges]
        # an instance with a non-finite entry gets a NaN answer (as jnp functions do)
        y = jnp.where(jnp.all(finite, axis=1, keepdims=True), y, jnp.nan)
        return y.astype(thetas.dtype)


def _best_listed_path(plan: _Plan, costs: Array) -> Array:
    """The cheapest of the listed paths (the first one among equals): `(N, E)`."""
    paths = jnp.asarray(plan.paths, costs.dtype)
    total = jnp.einsum("ne,pe->np", costs, paths, precision=jax.lax.Precision.HIGHEST)
    return paths[jnp.argmin(total, axis=1)]


def _best_incoming(plan: _Plan, dist: Array, costs: Array, nodes) -> tuple[Array, Array]:
    """For `nodes (K,)`: the best distance through an incoming edge, and that edge
    (the lowest index among equal ones). dist `(N, V+1)`, costs `(N, E+1)`."""
    edges = jnp.asarray(plan.incoming)[nodes]  # (K, D)
    tails = jnp.asarray(plan.senders)[edges]
    cand = dist[:, tails] + costs[:, edges]  # (N, K, D)
    arg = jnp.argmin(cand, axis=-1)
    best = jnp.take_along_axis(cand, arg[..., None], axis=-1)[..., 0]
    return best, edges[jnp.arange(edges.shape[0]), arg]


def _dag_dp(plan: _Plan, costs: Array) -> Array:
    """Exact dynamic programme over the levels of a DAG: the best incoming edge of
    every node `(N, V+1)` (the dummy edge E where none)."""
    n = costs.shape[0]
    v = plan.num_nodes
    dist = jnp.full((n, v + 1), jnp.inf, costs.dtype).at[:, plan.source].set(0)
    pred = jnp.full((n, v + 1), plan.num_edges, jnp.int32)

    def level(carry, nodes):
        dist, pred = carry
        best, edge = _best_incoming(plan, dist, costs, nodes)
        # the dummy node (padding) receives inf and the dummy edge: harmless
        return (dist.at[:, nodes].set(best), pred.at[:, nodes].set(edge)), None

    (_, pred), _ = jax.lax.scan(level, (dist, pred), jnp.asarray(plan.level_nodes))
    return pred


def _bellman_ford(plan: _Plan, costs: Array) -> Array:
    """Bellman-Ford (costs >= 0) with Jacobi sweeps and strict improvements only, so
    the predecessor edges form a tree even with zero-cost cycles."""
    n = costs.shape[0]
    v = plan.num_nodes
    nodes = np.arange(v + 1)
    dist = jnp.full((n, v + 1), jnp.inf, costs.dtype).at[:, plan.source].set(0)
    pred = jnp.full((n, v + 1), plan.num_edges, jnp.int32)

    def sweep(carry):
        dist, pred, _, it = carry
        best, edge = _best_incoming(plan, dist, costs, nodes)
        improved = best < dist
        # with costs >= 0, nodes at or above the target's distance cannot improve it
        active = jnp.any(improved & (best < dist[:, plan.target : plan.target + 1]))
        dist = jnp.where(improved, best, dist)
        return dist, jnp.where(improved, edge, pred), active, it + 1

    def cond(carry):
        _, _, active, it = carry
        return active & (it < plan.num_relevant)

    init = (dist, pred, jnp.array(True), jnp.array(0, jnp.int32))
    _, pred, _, _ = jax.lax.while_loop(cond, sweep, init)
    return pred


def _backtrack(plan: _Plan, pred: Array, max_steps: int) -> Array:
    """Follow the predecessor edges from the target back to the source; returns the
    edge indicators `(N, E+1)` (the last column, the dummy edge, is scratch)."""
    n = pred.shape[0]
    rows = jnp.arange(n)
    senders = jnp.asarray(plan.senders)
    y = jnp.zeros((n, plan.num_edges + 1), jnp.bool_)
    node = jnp.full((n,), plan.target, jnp.int32)

    def body(carry):
        y, node, it = carry
        active = node != plan.source
        edge = jnp.where(active, pred[rows, node], plan.num_edges)
        node = jnp.where(active, senders[edge], node)
        return y.at[rows, edge].set(True), node, it + 1

    def cond(carry):
        _, node, it = carry
        return jnp.any(node != plan.source) & (it < max_steps)

    y, _, _ = jax.lax.while_loop(cond, body, (y, node, jnp.array(0, jnp.int32)))
    return y
