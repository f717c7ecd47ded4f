"""BipartiteMatching: exactness against SciPy and brute force, ties, bounds, errors.

Thousands of instances go through one jitted call per shape (stacks are padded to a
fixed length so that shapes, and compilations, are shared between tests).
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import structpert as sp
from structpert._solvers import matching


BAD_INPUT = (ValueError, TypeError, jaxtyping.TypeCheckError)
SOLVER = sp.BipartiteMatching(method="jax")
_solve_stack = jax.jit(SOLVER.argmax_batch)
PAD = 512  # small instances are solved in stacks of this length


def solve(thetas):
    """Solve a stack with the pure-JAX kernel (small ones padded to PAD instances)."""
    thetas = np.asarray(thetas)
    num = thetas.shape[0]
    pad = (-num) % PAD if num <= PAD else 0
    padded = np.concatenate([thetas, np.zeros((pad, *thetas.shape[1:]), thetas.dtype)])
    return np.asarray(_solve_stack(jnp.asarray(padded)))[:num]


def scipy_values(thetas):
    thetas = np.asarray(thetas, np.float64)
    out = np.empty(thetas.shape[0])
    for b, t in enumerate(thetas):
        r, c = linear_sum_assignment(t, maximize=True)
        out[b] = t[r, c].sum()
    return out


def check_feasible(y):
    y = np.asarray(y)
    assert np.all((y == 0) | (y == 1)), "entries must be 0 or 1"
    assert np.all(y.sum(-1) == 1), "every row is matched exactly once"
    assert np.all(y.sum(-2) <= 1), "every column is matched at most once"


def random_stack(rng, kind, num, n, m):
    if kind == "continuous":
        return rng.standard_normal((num, n, m))
    if kind == "small_ints":  # many ties
        return rng.integers(0, 4, (num, n, m)).astype(float)
    if kind == "large":  # large magnitudes and a large common offset
        return 1e9 + 1e6 * rng.standard_normal((num, n, m))
    if kind == "negative":
        return -np.exp(3 * rng.standard_normal((num, n, m)))
    if kind == "mixed_scales":  # rows on very different scales
        scales = 10.0 ** rng.integers(-3, 4, (num, n, 1))
        return rng.standard_normal((num, n, m)) * scales
    raise ValueError(kind)


KINDS = ["continuous", "small_ints", "large", "negative", "mixed_scales"]


@pytest.mark.parametrize("n,m,per_kind", [(7, 7, 3000), (4, 6, 2000), (24, 24, 100)])
def test_random_instances_match_scipy(n, m, per_kind):
    rng = np.random.default_rng(n * 100 + m)
    thetas = np.concatenate([random_stack(rng, k, per_kind, n, m) for k in KINDS])
    y = solve(thetas)
    check_feasible(y)
    ours = np.sum(thetas * y, axis=(1, 2))
    ref = scipy_values(thetas)
    scale = np.abs(thetas).max(axis=(1, 2)) * n
    np.testing.assert_array_less(np.abs(ours - ref), 1e-12 * scale + 1e-12)
    # Integer weights: exactly the same optimum.
    ints = slice(per_kind, 2 * per_kind)
    np.testing.assert_array_equal(ours[ints], ref[ints])


def test_float32_matches_scipy():
    rng = np.random.default_rng(32)
    thetas = np.concatenate(
        [random_stack(rng, k, 1000, 12, 20) for k in ("continuous", "small_ints")]
    ).astype(np.float32)
    y = np.asarray(_solve_stack(jnp.asarray(thetas)))
    assert y.dtype == np.float32
    check_feasible(y)
    t64 = thetas.astype(np.float64)
    ours = np.sum(t64 * y, axis=(1, 2))
    ref = scipy_values(t64)
    # Arithmetic in float32: optimal up to float32 rounding of the duals.
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * 12 * np.abs(t64).max())
    np.testing.assert_array_equal(ours[1000:], ref[1000:])
    # For generic continuous weights the optimum is unique and must be found.
    assert np.mean(ours[:1000] == ref[:1000]) > 0.99


def brute_force_values(thetas):
    num, n, m = thetas.shape
    best = np.full(num, -np.inf)
    for cols in itertools.permutations(range(m), n):
        best = np.maximum(best, thetas[:, np.arange(n), list(cols)].sum(axis=1))
    return best


# Edge cases in the spirit of SciPy's own test suite (written as maximisation).
EDGE_3x3 = [
    -np.array([[400, 150, 400], [400, 450, 600], [300, 225, 300]]),  # min cost 850
    -np.array([[10, 10, 8], [9, 8, 1], [9, 7, 4]]),  # min cost 18
    np.zeros((3, 3)),
    np.full((3, 3), -7.5),
    np.array([[1e300, 0, 0], [0, 1e-300, 0], [0, 0, -1e300]]),
    np.eye(3)[::-1] * 1e-12,
    np.array([[0, 1, 2], [0, 1, 2], [0, 1, 2]]),  # every matching is optimal
]
EDGE_3x4 = [
    -np.array([[400, 150, 400, 1], [400, 450, 600, 2], [300, 225, 300, 3]]),  # 452
    np.zeros((3, 4)),
    np.array([[5, 5, 5, 6], [5, 5, 5, 6], [5, 5, 5, 6]]),  # one column for all
    -np.arange(12.0).reshape(3, 4) ** 2,
]
EDGE_VALUES = {0: -850.0, 1: -18.0}


@pytest.mark.parametrize("m", [3, 4])
def test_brute_force_and_edge_cases(m):
    rng = np.random.default_rng(m)
    edges = EDGE_3x3 if m == 3 else EDGE_3x4
    thetas = np.concatenate(
        [
            np.stack(edges).astype(np.float64),
            rng.integers(-2, 3, (300 - len(edges), 3, m)).astype(float),
            rng.standard_normal((PAD - 300, 3, m)),
        ]
    )
    y = solve(thetas)
    check_feasible(y)
    ours = np.sum(thetas * y, axis=(1, 2))
    ref = brute_force_values(thetas)
    finite = np.abs(thetas).max(axis=(1, 2)) < 1e100
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(ours[:300][finite[:300]], ref[:300][finite[:300]])
    if m == 3:
        for i, value in EDGE_VALUES.items():
            assert ours[i] == value
        # the extreme-magnitude instance: the 1e300 edge must be used
        assert y[4, 0, 0] == 1
    else:
        assert ours[0] == -452.0
        np.testing.assert_array_equal(y[2][:, 3], [1, 0, 0])


def test_ties_are_deterministic():
    # A constant theta gives the identity; rectangular: the first n columns.
    y = solve(np.stack([np.zeros((3, 3)), np.full((3, 3), 2.0)]))
    np.testing.assert_array_equal(y, np.stack([np.eye(3)] * 2))
    y = solve(np.zeros((1, 3, 4)))
    np.testing.assert_array_equal(y[0], np.eye(3, 4))
    # The result of an instance does not depend on the rest of the stack.
    rng = np.random.default_rng(7)
    thetas = rng.integers(0, 2, (400, 3, 3)).astype(float)
    alone = solve(thetas)
    shuffled = rng.permutation(400)
    again = solve(thetas[shuffled])
    np.testing.assert_array_equal(again, alone[shuffled])


def test_vmap_jit_and_argmax_agree():
    rng = np.random.default_rng(3)
    thetas = jnp.asarray(rng.integers(0, 3, (16, 3, 3)).astype(float))
    stacked = solve(thetas)
    vmapped = jax.jit(jax.vmap(SOLVER.argmax))(thetas)
    np.testing.assert_array_equal(vmapped, stacked)
    single = SOLVER.argmax(thetas[5])  # no jit
    np.testing.assert_array_equal(single, stacked[5])


def test_iteration_bound():
    # Without the warm start every row is inserted by an augmenting path; these
    # structured instances (c_ij = i * j and friends) make long paths.
    n = 7
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    structured = [-(i * j), i * j, -abs(i - j), (i + 1) * (j + 1) % n, -((i - j) ** 2)]
    rng = np.random.default_rng(0)
    thetas = np.concatenate(
        [np.stack(structured).astype(float), rng.standard_normal((200, n, n))]
    )
    run = jax.jit(lambda t, cap: matching._solve_jax(t, 0, cap))
    col4row, iterations = run(jnp.asarray(thetas), matching.max_iterations(n))
    assert int(iterations) <= matching.max_iterations(n)
    assert np.all(np.asarray(col4row) >= 0)
    np.testing.assert_allclose(
        np.take_along_axis(thetas, np.asarray(col4row)[..., None], 2).sum((1, 2)),
        scipy_values(thetas),
        rtol=1e-12,
    )
    # With a cap below what is needed, the loop stops and the error fires.
    col4row, iterations = run(jnp.asarray(thetas), 2)
    assert int(iterations) == 2 and np.any(np.asarray(col4row) < 0)


def test_iteration_cap_raises(monkeypatch):
    monkeypatch.setattr(matching, "max_iterations", lambda n: 1)
    solver = sp.BipartiteMatching(method="jax", auction_rounds=0)
    with pytest.raises(Exception, match="iteration bound"):
        jax.block_until_ready(solver.argmax_batch(jnp.asarray(np.eye(3)[None] * [1.0])))


def test_non_finite_raises():
    thetas = np.zeros((1, 3, 3))
    thetas[0, 1, 2] = np.nan
    with pytest.raises(Exception, match="NaN or infinite"):
        jax.block_until_ready(_solve_stack(jnp.asarray(np.repeat(thetas, PAD, 0))))


def test_bad_inputs():
    with pytest.raises(BAD_INPUT, match="n <= m"):
        SOLVER.argmax(jnp.zeros((4, 3)))
    with pytest.raises(BAD_INPUT):
        SOLVER.argmax(jnp.zeros((3, 3), jnp.int32))
    with pytest.raises(BAD_INPUT):
        SOLVER.argmax_batch(jnp.zeros((2, 3, 3), jnp.int32))
    with pytest.raises(BAD_INPUT):
        SOLVER.argmax_batch(jnp.zeros((3, 3)))
    with pytest.raises(BAD_INPUT, match="method"):
        sp.BipartiteMatching(method="hungarian")  # type: ignore[arg-type]
    with pytest.raises(BAD_INPUT, match="auction_rounds"):
        sp.BipartiteMatching(auction_rounds=-1)
    # empty instances are fine
    assert SOLVER.argmax(jnp.zeros((0, 3))).shape == (0, 3)


def test_methods_registry_and_auto():
    assert isinstance(sp.make_solver("bipartite_matching"), sp.BipartiteMatching)
    assert "bipartite_matching" in sp.list_solvers()
    assert sp.BipartiteMatching.event_ndim == 2
    on_cpu = jax.default_backend() == "cpu"
    assert sp.BipartiteMatching().resolved_method(10) == ("scipy" if on_cpu else "jax")
    assert sp.BipartiteMatching().resolved_method(50) == "jax"
    assert sp.BipartiteMatching(method="scipy").resolved_method(50) == "scipy"
    rng = np.random.default_rng(11)
    thetas = jnp.asarray(rng.standard_normal((300, 3, 4)))  # shares a compilation
    y_scipy = jax.jit(sp.BipartiteMatching(method="scipy").argmax_batch)(thetas)
    check_feasible(y_scipy)
    # Generic continuous weights: unique optimum, so both methods agree exactly.
    np.testing.assert_array_equal(y_scipy, solve(thetas))
    # nested vmap over the scipy method still works (one host call)
    y2 = jax.vmap(jax.vmap(sp.BipartiteMatching(method="scipy").argmax))(
        thetas.reshape(3, 100, 3, 4)
    )
    np.testing.assert_array_equal(y2.reshape(300, 3, 4), y_scipy)


def test_layer_and_loss():
    rng = np.random.default_rng(5)
    theta = jnp.asarray(rng.standard_normal((2, 4, 4)))
    y_true = jnp.broadcast_to(jnp.eye(4), theta.shape)
    key = jax.random.key(0)
    y_eps = {}
    for method in ("jax", "scipy"):
        solver = sp.BipartiteMatching(method=method)
        opt = sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=0.5, num_samples=8)
        loss = sp.FenchelYoungLoss(opt)
        grad = eqx.filter_jit(jax.grad(lambda t: loss(t, y_true, key=key).sum()))
        # the gradient of the Fenchel-Young loss is y_eps - y_true
        y_eps[method] = grad(theta) + y_true
        np.testing.assert_allclose(y_eps[method].sum(-1), 1.0, atol=1e-12)
        assert np.all(np.asarray(y_eps[method].sum(-2)) <= 1 + 1e-12)
        assert np.all(np.asarray(y_eps[method]) >= 0)
    # Same noise, unique optima: both methods see the same matchings.
    np.testing.assert_allclose(y_eps["jax"], y_eps["scipy"], atol=1e-12)
    # and y_eps is a proper average of matchings: multiples of 1/8
    np.testing.assert_allclose(y_eps["jax"] * 8, np.round(y_eps["jax"] * 8), atol=1e-9)
