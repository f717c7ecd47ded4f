"""HostSolver: NumPy/SciPy solvers through one `jax.pure_callback` per batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from helpers import permutations
from scipy.optimize import linear_sum_assignment

import structpert as sp


@pytest.fixture(autouse=True)
def _fast_compile():
    """These tests compile many small programs once each: skip most XLA
    optimisations, which roughly halves the compile time and changes only speed."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


class CountingRanks:
    """A host ranking solver (0-based ascending ranks) that records every host call."""

    def __init__(self):
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, thetas):
        self.calls.append(thetas.shape)
        return np.argsort(np.argsort(thetas, axis=-1, kind="stable"), axis=-1)


def _setup(dtype="float64", **kwargs):
    counter = CountingRanks()
    solver = sp.HostSolver(counter, event_ndim=1, batched=True)
    opt = sp.PerturbedOptimizer(solver, sigma=0.5, num_samples=8, **kwargs)
    theta = jax.random.normal(jax.random.key(0), (3, 5), dtype)
    return counter, opt, theta


@eqx.filter_jit
def _fy_and_jvp(opt, theta, y_true, key):
    """Fenchel-Young value and gradient, and a JVP of the layer, in one compilation."""
    loss = sp.FenchelYoungLoss(opt)
    value, grad = jax.value_and_grad(lambda t: loss(t, y_true, key=key).sum())(theta)
    _, tangent = jax.jvp(lambda x: opt(x, key=key), (theta,), (jnp.ones_like(theta),))
    return value, grad, tangent


def test_matches_jax_solver_with_one_call_per_pass():
    dtype = "float64"
    counter, opt, theta = _setup(dtype)
    # the same ranks from a pure-JAX solver that, like the host one, declares no
    # shift invariance (the Permutahedron's would change the estimator)
    ranks = sp.FunctionSolver(sp.Permutahedron().argmax, event_ndim=1)
    ref = eqx.tree_at(lambda o: o.solver, opt, ranks)
    y_true = jnp.tile(jnp.arange(5, dtype=dtype), (3, 1))
    key = jax.random.key(1)
    host = _fy_and_jvp(opt, theta, y_true, key)
    # One host call for the FY value and gradient, one for the layer and its JVP,
    # each on all 3 x 8 perturbed instances at once.
    assert counter.calls == [(24, 5), (24, 5)]
    host_again = _fy_and_jvp(opt, 2.0 * theta, y_true, key)  # jitted: no retrace
    assert len(counter.calls) == 4
    expected = _fy_and_jvp(ref, theta, y_true, key)
    assert host[1].dtype == theta.dtype
    # Same samples, same solutions: values, gradients and JVPs agree to rounding (two
    # compiled programs may sum in different orders, as on a GPU).
    rtol = 1e-12 if theta.dtype == jnp.float64 else 1e-5
    for a, b in zip(host, expected):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    assert not np.array_equal(host_again[0], host[0])


def test_vmap_makes_one_host_call():
    counter, opt, theta = _setup()
    key = jax.random.key(2)
    keys = jax.random.split(key, 2)
    layer = jax.jit(jax.vmap(lambda t, k: opt(t, key=k)))
    out = layer(jnp.stack([theta, theta]), keys)
    assert out.shape == (2, 3, 5)
    assert len(counter.calls) == 1 and np.prod(counter.calls[0]) == 2 * 24 * 5
    # Each vmapped instance gets its own noise (the keys differ).
    assert not np.array_equal(out[0], out[1])


def test_chunks_make_one_call_each():
    counter, opt, theta = _setup("float32", chunk_size=10)
    y = jax.jit(lambda t: opt(t, key=jax.random.key(3)))(theta)
    # 3 instances x 8 samples, streamed: 3 samples of each instance per call (9 <= 10),
    # the last chunk padded
    assert counter.calls == [(9, 5)] * 3
    assert y.dtype == theta.dtype  # the host sees and returns the dtype of theta
    np.testing.assert_allclose(y.sum(-1), 10.0, rtol=1e-6)  # averages of rank vectors


def test_per_instance_function_matches_batched():
    # batched=False: the host function sees one instance at a time, inside one callback.
    seen = []

    def one(t):
        seen.append(t.shape)
        return np.argsort(np.argsort(t, kind="stable"))

    counter = CountingRanks()
    looped = sp.HostSolver(one, event_ndim=1)
    batched = sp.HostSolver(counter, event_ndim=1, batched=True)
    thetas = jax.random.normal(jax.random.key(4), (2, 12, 5))
    # Under vmap too: the 2 x 12 instances reach the host in one call.
    ys = jax.jit(jax.vmap(looped.argmax_batch))(thetas)
    np.testing.assert_array_equal(ys, jax.jit(jax.vmap(batched.argmax_batch))(thetas))
    assert seen == [(5,)] * 24
    assert counter.calls == [(24, 5)]  # vmapped axes folded into the stack


def _assignment(theta):
    rows, cols = linear_sum_assignment(theta, maximize=True)
    y = np.zeros_like(theta)
    y[rows, cols] = 1.0
    return y


def test_scipy_assignment_is_optimal_and_differentiable():
    solver = sp.HostSolver(_assignment, event_ndim=2)
    rng = np.random.default_rng(0)
    perms = [p.astype(int) for p in permutations(4)]
    thetas = rng.normal(size=(50, 4, 4))
    ys = np.asarray(jax.jit(solver.argmax_batch)(jnp.asarray(thetas)))
    for theta, y in zip(thetas, ys):
        best = max(float(np.sum(theta[np.arange(4), p])) for p in perms)
        assert np.isclose(np.sum(theta * y), best)
    opt = sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=0.5, num_samples=32)
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(5)

    @jax.jit
    def layer_and_grad(theta, y_true):
        grad = jax.grad(lambda t: loss(t, y_true, key=key).sum())(theta)
        return opt(theta, key=key), grad

    theta, y_true = jnp.asarray(thetas[:2]), jnp.asarray(ys[:2])
    y_eps, grad = layer_and_grad(theta, y_true)
    np.testing.assert_allclose(y_eps.sum(-1), 1.0)  # a convex combination of matchings
    np.testing.assert_allclose(y_eps.sum(-2), 1.0)
    assert 0.0 < float(jnp.max(jnp.abs(grad))) < 2.0
    np.testing.assert_allclose(grad, y_eps - y_true, atol=1e-12)


def test_bad_arguments():
    errors = (ValueError, TypeError, jaxtyping.TypeCheckError)
    with pytest.raises(errors, match="fn"):
        sp.HostSolver("not a function")  # type: ignore[arg-type]
    with pytest.raises(errors, match="event_ndim"):
        sp.HostSolver(np.sort, event_ndim=-1)
    with pytest.raises(errors, match="batched"):
        sp.HostSolver(np.sort, batched="yes")  # type: ignore[arg-type]
    with pytest.raises(errors, match="event_ndim"):
        sp.HostSolver(np.sort, event_ndim=2).argmax_batch(jnp.zeros((3, 4)))
    # A host function returning the wrong shape fails loudly, naming the fix.
    bad = sp.HostSolver(lambda t: t[:-1], event_ndim=1)
    opt = sp.PerturbedOptimizer(bad, num_samples=2)
    with pytest.raises(Exception, match="same shape as theta"):
        jax.block_until_ready(opt(jnp.zeros(4), key=jax.random.key(0)))
