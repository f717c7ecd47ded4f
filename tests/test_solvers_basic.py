"""Simplex, TopK and Permutahedron against brute force, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import brute_force_argmax, k_hot, permutations

import structpert as sp


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
