"""Simplex, TopK and Permutahedron against brute force, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import brute_force_argmax, k_hot, permutations

import structpert as sp
from structpert._solvers.base import solve_batch


def _instances(n, count, seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # small integers: many exact ties
        return rng.integers(-2, 3, size=(count, n)).astype(np.float64)
    return rng.normal(size=(count, n))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "solver, candidates",
    [
        (sp.Simplex(), lambda n: k_hot(n, 1)),
        (sp.TopK(1), lambda n: k_hot(n, 1)),
        (sp.TopK(2), lambda n: k_hot(n, 2)),
        (sp.TopK(3), lambda n: k_hot(n, 3)),
        (sp.Permutahedron(), permutations),
    ],
    ids=["simplex", "top1", "top2", "top3", "permutahedron"],
)
def test_against_brute_force(solver, candidates, ties):
    n = 5
    thetas = _instances(n, 300, seed=n + 17 * ties, ties=ties)
    ys = np.asarray(jax.jit(jax.vmap(solver.argmax))(jnp.asarray(thetas)))
    cands = candidates(n)
    cand_set = {tuple(c) for c in cands}
    for theta, y in zip(thetas, ys):
        assert tuple(y) in cand_set  # feasible
        _, best = brute_force_argmax(theta, cands)
        assert np.isclose(np.dot(theta, y), best)  # optimal


def test_documented_tie_breaking():
    theta = jnp.array([1.0, 3.0, 3.0, 0.0, 3.0])
    np.testing.assert_array_equal(sp.Simplex().argmax(theta), [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(sp.TopK(2).argmax(theta), [0, 1, 1, 0, 0])
    # equal entries get increasing ranks in index order, as a double stable argsort
    np.testing.assert_array_equal(sp.Permutahedron().argmax(theta), [1, 2, 3, 0, 4])
    np.testing.assert_array_equal(
        sp.Permutahedron().argmax(theta), jnp.argsort(jnp.argsort(theta, stable=True), stable=True)
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_output_dtype_and_shape(dtype):
    theta = jnp.linspace(-1, 1, 6, dtype=dtype)
    for solver in [sp.Simplex(), sp.TopK(2), sp.Permutahedron()]:
        y = solver.argmax(theta)
        assert y.shape == theta.shape and y.dtype == theta.dtype


def test_permutahedron_matches_double_argsort_on_large_inputs():
    theta = jax.random.normal(jax.random.key(0), (64, 200))
    ranks = jax.vmap(sp.Permutahedron().argmax)(theta)
    np.testing.assert_array_equal(ranks, jnp.argsort(jnp.argsort(theta, axis=-1), axis=-1))


@pytest.mark.parametrize(
    "solver, shape",
    [
        (sp.Simplex(), (6,)),
        (sp.TopK(3), (6,)),
        (sp.Permutahedron(), (6,)),
        (sp.BipartiteMatching(), (4, 4)),
        (sp.BipartiteMatching(), (3, 5)),
    ],
)
def test_declared_shift_invariance_holds(solver, shape):
    """What `shift_invariant_axes` declares (the layer's Jacobian estimator relies on
    it): adding a constant to theta along each declared axis (a different constant
    for each line) leaves the solution unchanged, and the solutions' sums along that
    axis are the same for every instance; the rectangular matching's columns do not
    qualify (their sums differ between instances)."""
    declared = solver.shift_invariant_axes(shape)
    expected = {(4, 4): (-2, -1), (3, 5): (-1,)}.get(shape, (-1,))
    assert declared == expected
    rng = np.random.default_rng(0)
    thetas = jnp.asarray(rng.normal(size=(200, *shape)), jnp.float32)
    solve = jax.jit(lambda t: solve_batch(solver, t))
    ys = np.asarray(solve(thetas))
    for axis in declared:
        shift_shape = list((200, *shape))
        shift_shape[axis] = 1
        shifts = jnp.asarray(rng.normal(size=shift_shape) * 3, jnp.float32)
        np.testing.assert_array_equal(np.asarray(solve(thetas + shifts)), ys)
        sums = ys.sum(axis=axis)
        np.testing.assert_array_equal(sums, np.broadcast_to(sums[:1], sums.shape))
    if shape == (3, 5):
        assert len(np.unique(ys.sum(axis=-2), axis=0)) > 1
