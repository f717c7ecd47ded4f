"""The layer and the loss: closed forms, transformations, one solver pass, errors."""

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BAD_INPUT, bad_input, DTYPES, mc_tol
from scipy.stats import norm

import structpert as sp


GAMMA = float(np.euler_gamma)


def _replicate(theta, k):
    return jnp.broadcast_to(theta, (k, *theta.shape))


def _jacobian_replicates(fn, thetas):
    """Per-instance Jacobians (K, d_out, d_in) of a batched layer, by forward mode."""
    d = thetas.shape[-1]
    cols = []
    for j in range(d):
        tangent = jnp.zeros_like(thetas).at[:, j].set(1.0)
        cols.append(jax.jvp(fn, (thetas,), (tangent,))[1])
    return jnp.stack(cols, axis=-1)


def _check_replicates(estimates, exact, z=5.0):
    """Mean of K independent replicates within z standard errors of `exact`."""
    estimates = np.asarray(estimates, np.float64)
    k = estimates.shape[0]
    mean = estimates.mean(0)
    tol = mc_tol(estimates.std(0, ddof=1), k, z) + 1e-6
    np.testing.assert_array_less(np.abs(mean - np.asarray(exact)), tol)


# ---------------------------------------------------------------- closed forms


@pytest.mark.parametrize("dtype", DTYPES)
def test_gumbel_simplex_is_softmax(dtype):
    theta = jnp.array([0.4, -1.3, 2.2, 0.9, 0.0, -0.5], dtype)
    sigma, m = 0.7, 20_000
    opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), sigma=sigma, num_samples=m)
    y = opt(theta, key=jax.random.key(3))
    assert y.dtype == theta.dtype and y.shape == theta.shape
    p = np.asarray(jax.nn.softmax(theta.astype(jnp.float64) / sigma))
    np.testing.assert_array_less(np.abs(np.asarray(y) - p), mc_tol(np.sqrt(p * (1 - p)), m) + 1e-6)
    assert abs(float(jnp.sum(y)) - 1.0) < 1e-5


@pytest.mark.parametrize(
    "control_variate", ["none", "leave_one_out", "unperturbed", "covariance"]
)
def test_gumbel_simplex_jacobian(control_variate):
    theta = jnp.array([1.0, -0.2, 0.3, 2.0])
    sigma = 0.8
    opt = sp.PerturbedOptimizer(
        sp.Simplex(), sp.Gumbel(), sigma, num_samples=200, control_variate=control_variate
    )
    jac = _jacobian_replicates(lambda t: opt(t, key=jax.random.key(5)), _replicate(theta, 400))
    p = jax.nn.softmax(theta / sigma)
    exact = (jnp.diag(p) - jnp.outer(p, p)) / sigma
    _check_replicates(jac, exact)
    # reverse mode gives the same numbers as forward mode (one estimator)
    rev = jax.jacrev(lambda t: opt(t, key=jax.random.key(5)))(theta)
    fwd = jax.jacfwd(lambda t: opt(t, key=jax.random.key(5)))(theta)
    np.testing.assert_allclose(rev, fwd, rtol=1e-6, atol=1e-9)


def test_gumbel_simplex_perturbed_max_and_its_gradient():
    theta = jnp.array([0.5, 1.5, -0.7, 0.2, 1.1])
    sigma, m = 0.3, 20_000
    opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), sigma, num_samples=m)
    f = opt.max(theta, key=jax.random.key(0))
    exact = sigma * jax.nn.logsumexp(theta / sigma) + sigma * GAMMA
    # the max of Gumbel-perturbed scores is Gumbel with scale sigma: std = sigma*pi/sqrt(6)
    assert abs(float(f - exact)) < mc_tol(sigma * math.pi / math.sqrt(6), m)
    # its gradient: with the score function, exactly the layer's y_eps (the mean of
    # the same solutions); with conditional Monte Carlo (the default here), another
    # estimate of y_eps = softmax(theta / sigma), within 5 standard errors of one
    # sample's indicator (an upper bound on the conditional estimate's spread)
    key = jax.random.key(0)
    score = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), sigma, m, jacobian="score")
    grad = jax.grad(lambda t: score.max(t, key=key))(theta)
    np.testing.assert_allclose(grad, score(theta, key=key), rtol=1e-6, atol=1e-7)
    grad = jax.grad(lambda t: opt.max(t, key=key))(theta)
    p = jax.nn.softmax(theta / sigma)
    # per sample: E[y_i | the others' noise] (std at most a Bernoulli's) plus the
    # mean over j of such differences (std at most twice the mean Bernoulli std)
    bernoulli = np.sqrt(p * (1 - p))
    assert np.all(np.abs(grad - p) <= mc_tol(bernoulli + 2 * np.mean(bernoulli), m))
    assert abs(float(jnp.sum(grad)) - 1) < 1e-9


def test_normal_two_items_probit_and_its_derivative():
    theta = jnp.array([0.35, -0.15])
    sigma, m = 0.6, 400
    opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Normal(), sigma, num_samples=m)
    u = (0.35 + 0.15) / (sigma * math.sqrt(2))
    p1 = norm.cdf(u)
    reps = _replicate(theta, 300)
    y = opt(reps, key=jax.random.key(11))
    _check_replicates(y[:, 0:1], [p1])
    jac = _jacobian_replicates(lambda t: opt(t, key=jax.random.key(11)), reps)
    dp = norm.pdf(u) / (sigma * math.sqrt(2))
    _check_replicates(jac[:, 0, :], [dp, -dp])


def test_gumbel_ranks_are_sums_of_pairwise_sigmoids():
    """Rank i counts the items below i, and the difference of two Gumbel variables is
    logistic: y_eps(theta)_i = sum_{j != i} sigmoid((theta_i - theta_j) / eps)."""
    theta = jnp.array([0.3, -1.2, 2.0, 0.5, 0.1])
    sigma = 0.7
    opt = sp.PerturbedOptimizer(sp.Permutahedron(), sp.Gumbel(), sigma, num_samples=200)
    s = jax.nn.sigmoid((theta[:, None] - theta[None, :]) / sigma)
    ds = s * (1 - s) / sigma * (1 - jnp.eye(theta.size))  # d s_ij / d theta_i, 0 if j == i
    exact_y = jnp.sum(s, axis=1) - 0.5  # without the j == i term, sigmoid(0)
    exact_jac = jnp.diag(jnp.sum(ds, axis=1)) - ds
    reps = _replicate(theta, 400)
    _check_replicates(opt(reps, key=jax.random.key(2)), exact_y)
    jac = _jacobian_replicates(lambda t: opt(t, key=jax.random.key(2)), reps)
    _check_replicates(jac, exact_jac)


def test_topk_one_equals_simplex_with_normal_noise():
    theta = jax.random.normal(jax.random.key(0), (7,))
    a = sp.PerturbedOptimizer(sp.Simplex(), sp.Normal(), 0.5, num_samples=64)
    b = sp.PerturbedOptimizer(sp.TopK(1), sp.Normal(), 0.5, num_samples=64)
    key = jax.random.key(1)
    np.testing.assert_allclose(a(theta, key=key), b(theta, key=key))
    np.testing.assert_allclose(
        jax.jacrev(lambda t: a(t, key=key))(theta), jax.jacrev(lambda t: b(t, key=key))(theta)
    )


def test_gradient_in_sigma():
    theta = jnp.array([0.5, -0.4, 1.2])
    sigma = 0.9
    key = jax.random.key(2)

    def layer(s):
        return sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), s, num_samples=200)

    reps = _replicate(theta, 400)
    d_y = jax.jacfwd(lambda s: layer(s)(reps, key=key))(jnp.asarray(sigma))
    exact_y = jax.jacfwd(lambda s: jax.nn.softmax(theta / s))(sigma)
    _check_replicates(d_y, exact_y)
    d_f = jax.grad(lambda s: layer(s).max(reps, key=key).sum())(jnp.asarray(sigma))
    d_f_exact = jax.grad(lambda s: s * jax.nn.logsumexp(theta / s) + s * GAMMA)(sigma)
    # d_f sums 400 replicates of a pathwise estimate with per-sample std < 2 (|<Y, Z>|)
    assert abs(float(d_f) / 400 - float(d_f_exact)) < mc_tol(2.0, 400 * 200)


def test_multiplicative_gumbel_closed_forms():
    # theta * exp(eps Z - eps^2/2) with Gumbel Z: argmax is that of log(theta) + eps Z, so
    # y_eps = softmax(log(theta) / eps) for positive theta, with Jacobian
    # (diag p - p p^T) diag(1 / theta) / eps.
    theta = jnp.array([0.5, 2.0, 1.0, 1.5])
    sigma = 0.4
    opt = sp.PerturbedOptimizer(
        sp.Simplex(), sp.Gumbel(), sigma, num_samples=200, perturbation="multiplicative"
    )
    reps = _replicate(theta, 400)
    key = jax.random.key(4)
    p = jax.nn.softmax(jnp.log(theta) / sigma)
    _check_replicates(opt(reps, key=key), p)
    jac = _jacobian_replicates(lambda t: opt(t, key=key), reps)
    _check_replicates(jac, (jnp.diag(p) - jnp.outer(p, p)) / sigma / theta[None, :])
    # F_eps = E[max_i theta_i e^{eps Z_i - eps^2/2}] = e^{-eps^2/2} Gamma(1 - eps) ||theta||_{1/eps}
    def f_exact(t):
        return (
            jnp.exp(-(sigma**2) / 2)
            * math.gamma(1 - sigma)
            * jnp.sum(t ** (1 / sigma)) ** sigma
        )

    grads = jax.vmap(jax.grad(lambda t, i: opt.max(t[None], key=jax.random.fold_in(key, i))[0]))(
        reps, jnp.arange(400)
    )
    _check_replicates(grads, jax.grad(f_exact)(theta))


# ---------------------------------------------------------------- one solver pass


def _counting_solver():
    calls = []

    def host(theta):
        calls.append(1)
        return (np.arange(theta.shape[-1]) == np.argmax(theta)).astype(theta.dtype)

    def fn(theta):
        shape = jax.ShapeDtypeStruct(theta.shape, theta.dtype)
        return jax.pure_callback(host, shape, theta, vmap_method="sequential")

    return sp.FunctionSolver(fn, event_ndim=1), calls


@pytest.mark.parametrize(
    "control_variate", ["none", "leave_one_out", "unperturbed", "regression", "orthogonal"]
)
def test_one_solver_pass_per_value_and_grad(control_variate):
    solver, calls = _counting_solver()
    m, batch = 5, 3
    if control_variate == "orthogonal":  # the sampling option, with the default baseline
        opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Normal(), num_samples=m, orthogonal=True)
    else:
        opt = sp.PerturbedOptimizer(sp.Simplex(), num_samples=m, control_variate=control_variate)
    opt = eqx.tree_at(lambda o: o.solver, opt, solver)
    extra = 1 if control_variate == "unperturbed" else 0
    theta = jax.random.normal(jax.random.key(0), (batch, 4))
    y_true = jax.nn.one_hot(jnp.array([0, 2, 1]), 4)
    w = jax.random.normal(jax.random.key(1), (batch, 4))
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(2)

    jax.value_and_grad(lambda t: loss(t, y_true, key=key).sum())(theta)
    assert len(calls) == batch * (m + extra)
    calls.clear()
    jax.jit(jax.value_and_grad(lambda t: loss(t, y_true, key=key).sum()))(theta)
    assert len(calls) == batch * (m + extra)
    calls.clear()
    jax.value_and_grad(lambda t: jnp.sum(w * opt(t, key=key)))(theta)
    assert len(calls) == batch * (m + extra)
    calls.clear()
    jax.jvp(lambda t: opt(t, key=key), (theta,), (w,))
    assert len(calls) == batch * (m + extra)


def test_fenchel_young_value_and_gradient():
    theta = jnp.array([[0.2, 1.4, -0.3], [1.0, 0.0, 0.5]])
    y_true = jnp.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sigma, m = 0.5, 10_000
    opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), sigma, num_samples=m)
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(7)
    ell = loss(theta, y_true, key=key)
    assert ell.shape == (2,)
    exact = sigma * jax.nn.logsumexp(theta / sigma, axis=-1) + sigma * GAMMA
    exact = exact - jnp.sum(theta * y_true, axis=-1)
    np.testing.assert_array_less(jnp.abs(ell - exact), mc_tol(sigma * math.pi / math.sqrt(6), m))
    # With the score function, the gradient is exactly the layer's y_eps - y (the
    # same solutions); with conditional Monte Carlo (the default here) it is another
    # estimate of y_eps: per sample, E[y_i | the other entries' noise] (std at most
    # 0.5, a Bernoulli's) plus the mean of such differences (std at most 1).
    score = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), sigma, m, jacobian="score")
    plain = jax.grad(lambda t: sp.FenchelYoungLoss(score)(t, y_true, key=key).sum())(theta)
    np.testing.assert_allclose(plain, score(theta, key=key) - y_true, rtol=1e-6, atol=1e-9)
    grad = jax.grad(lambda t: loss(t, y_true, key=key).sum())(theta)
    p = jax.nn.softmax(theta / sigma)
    np.testing.assert_array_less(jnp.abs(plain - (p - y_true)), mc_tol(0.5, m))
    np.testing.assert_array_less(jnp.abs(grad - (p - y_true)), mc_tol(1.5, m))


# ---------------------------------------------------------------- transformations


def _opt(**kwargs):
    kwargs.setdefault("num_samples", 16)
    return sp.PerturbedOptimizer(sp.Permutahedron(), sp.Normal(), 0.3, **kwargs)


def test_batch_axes_and_batch_size_independence():
    opt = _opt()
    key = jax.random.key(0)
    theta = jax.random.normal(jax.random.key(1), (2, 3, 5))
    y = opt(theta, key=key)
    assert y.shape == (2, 3, 5)
    flat = opt(theta.reshape(6, 5), key=key)
    np.testing.assert_allclose(y.reshape(6, 5), flat)
    # instance i sees the same noise in a batch of 6 and in a batch of 2
    np.testing.assert_allclose(opt(theta.reshape(6, 5)[:2], key=key), flat[:2])
    # an unbatched call equals instance 0 of a batch
    np.testing.assert_allclose(opt(theta[0, 0], key=key), flat[0])
    assert opt.max(theta, key=key).shape == (2, 3)


class _NotElementwiseNormal(sp.Normal):
    """The Normal law, without the `elementwise` promise: drawn per instance."""

    elementwise: ClassVar[bool] = False


@pytest.mark.parametrize(
    "noise, impl, antithetic, one_draw, stratified",
    [
        (sp.Normal(), "threefry2x32", False, True, False),
        (sp.Normal(), "threefry2x32", True, True, False),
        (sp.Gumbel(), "threefry2x32", False, True, False),
        (sp.Normal(), "rbg", False, False, False),
        (_NotElementwiseNormal(), "threefry2x32", True, False, False),
        (sp.Gumbel(), "threefry2x32", False, True, True),
        (sp.Normal(), "rbg", True, False, True),
    ],
)
def test_noise_of_instance_i_depends_only_on_key_and_i(
    noise, impl, antithetic, one_draw, stratified
):
    from structpert._perturbed import _Config, _draw_noise, _one_draw

    key = jax.random.key(7, impl=impl)
    f32 = jnp.dtype("float32")
    assert _one_draw(noise, key) == one_draw
    cfg = _Config(
        sp.Permutahedron(), noise, 6, 1, "additive", "none", antithetic, None,
        stratified=stratified,
    )
    z9 = _draw_noise(cfg, key, 9, (4,), f32)
    z2 = _draw_noise(cfg, key, 2, (4,), f32)
    assert z9.shape == (9, 6, 4)
    np.testing.assert_array_equal(z9[:2], z2)
    if antithetic:
        np.testing.assert_array_equal(z9[:, 3:], -z9[:, :3])
    # distinct instances and samples get distinct noise
    assert np.unique(np.asarray(z9[:, : 3 if antithetic else 6])).size == 9 * 4 * (
        3 if antithetic else 6
    )
    if not (one_draw or stratified) and impl == "threefry2x32":
        # the fallback draws from fold_in(key, i)
        z = noise.sample(jax.random.fold_in(key, 5), (3 if antithetic else 6, 4), f32)
        np.testing.assert_array_equal(z9[5, : z.shape[0]], z)


def test_jit_vmap_and_filter_jit_agree():
    opt = _opt()
    key = jax.random.key(0)
    theta = jax.random.normal(jax.random.key(1), (4, 5))
    eager = opt(theta, key=key)
    np.testing.assert_allclose(jax.jit(lambda t: opt(t, key=key))(theta), eager, rtol=1e-6)
    jitted = eqx.filter_jit(lambda o, t: o(t, key=key))(opt, theta)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    # vmap with one key: each row as an unbatched call (= instance 0 of its own batch)
    vm = jax.vmap(lambda t: opt(t, key=key))(theta)
    np.testing.assert_allclose(vm[2], opt(theta[2], key=key), rtol=1e-6)
    # vmap with one key per row
    keys = jax.random.split(key, 4)
    vk = jax.vmap(lambda t, k: opt(t, key=k))(theta, keys)
    np.testing.assert_allclose(vk[1], opt(theta[1], key=keys[1]), rtol=1e-6)
    g = jax.vmap(jax.grad(lambda t, k: opt.max(t, key=k)))(theta, keys)
    assert g.shape == theta.shape


def test_grad_of_vmapped_and_jitted_layer_matches_jvp():
    opt = _opt(control_variate="none")
    key = jax.random.key(3)
    theta = jax.random.normal(jax.random.key(1), (3, 5))
    w = jax.random.normal(jax.random.key(2), (3, 5))
    v = jax.random.normal(jax.random.key(4), (3, 5))
    f = lambda t: jnp.sum(w * opt(t, key=key))
    g = jax.jit(jax.grad(f))(theta)
    _, jv = jax.jvp(f, (theta,), (v,))
    np.testing.assert_allclose(jnp.sum(g * v), jv, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_are_preserved(dtype):
    opt = _opt()
    theta = jnp.linspace(-1, 1, 5, dtype=dtype)
    key = jax.random.key(0)
    assert opt(theta, key=key).dtype == theta.dtype
    assert opt.max(theta, key=key).dtype == theta.dtype
    assert jax.grad(lambda t: opt.max(t, key=key))(theta).dtype == theta.dtype
    assert jax.jacrev(lambda t: opt(t, key=key))(theta).dtype == theta.dtype


def test_antithetic_and_chunked():
    theta = jax.random.normal(jax.random.key(1), (3, 6))
    key = jax.random.key(0)
    full = _opt(num_samples=20)
    chunked = _opt(num_samples=20, chunk_size=7)
    np.testing.assert_allclose(full(theta, key=key), chunked(theta, key=key), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jacrev(lambda t: full(t, key=key))(theta),
        jax.jacrev(lambda t: chunked(t, key=key))(theta),
        rtol=1e-6,
        atol=1e-9,
    )
    anti = _opt(num_samples=20, antithetic=True)
    assert anti(theta, key=key).shape == theta.shape


def test_traced_sigma_and_learned_sigma():
    theta = jnp.array([0.1, 0.5, -0.3])
    key = jax.random.key(0)

    @jax.jit
    def f(s):
        return sp.PerturbedOptimizer(sp.Simplex(), sigma=s, num_samples=32)(theta, key=key)

    assert f(0.5).shape == (3,)
    with pytest.raises(Exception, match="sigma"):
        jax.block_until_ready(f(-1.0))  # on a GPU the error surfaces at the sync


# ---------------------------------------------------------------- errors


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="sigma"):
        sp.PerturbedOptimizer(sp.Simplex(), sigma=0.0)
    with pytest.raises(ValueError, match="sigma"):
        sp.PerturbedOptimizer(sp.Simplex(), sigma=-1)
    with pytest.raises(ValueError, match="num_samples"):
        sp.PerturbedOptimizer(sp.Simplex(), num_samples=0)
    with bad_input("num_samples"):
        sp.PerturbedOptimizer(sp.Simplex(), num_samples=2.5)  # type: ignore[arg-type]
    with bad_input("perturbation"):
        sp.PerturbedOptimizer(sp.Simplex(), perturbation="mult")  # type: ignore[arg-type]
    with bad_input("control_variate"):
        sp.PerturbedOptimizer(sp.Simplex(), control_variate="loo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="antithetic"):
        sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), antithetic=True)
    with pytest.raises(ValueError, match="even"):
        sp.PerturbedOptimizer(sp.Simplex(), sp.Normal(), num_samples=5, antithetic=True)
    with pytest.raises(ValueError, match="chunk_size"):
        sp.PerturbedOptimizer(sp.Simplex(), chunk_size=0)
    with bad_input("solver"):
        sp.PerturbedOptimizer(lambda t: t)  # type: ignore[arg-type]
    with pytest.raises(BAD_INPUT):
        sp.PerturbedOptimizer(sp.Simplex(), noise="gumbel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        sp.TopK(0)
    with bad_input("optimizer"):
        sp.FenchelYoungLoss(sp.Simplex())  # type: ignore[arg-type]


def test_bad_call_arguments():
    opt = _opt()
    key = jax.random.key(0)
    with bad_input("floating"):
        opt(jnp.arange(5), key=key)
    with bad_input("axes"):
        sp.PerturbedOptimizer(sp.TopK(2))(jnp.array(1.0), key=key)
    with pytest.raises(BAD_INPUT):
        opt(jnp.ones(5), key=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k"):
        sp.PerturbedOptimizer(sp.TopK(7))(jnp.ones(5), key=key)
    loss = sp.FenchelYoungLoss(opt)
    with bad_input("y_true"):
        loss(jnp.ones((2, 5)), jnp.ones((2, 4)), key=key)
    with bad_input("y_true"):
        loss(jnp.ones((2, 5)), jnp.ones(5), key=key)


def test_theta_errors_without_the_type_checking_hook():
    from structpert._perturbed import _check_theta

    with pytest.raises(TypeError, match="floating dtype.*astype"):
        _check_theta(jnp.arange(3), 1, "Layer")
    with pytest.raises(ValueError, match="at least 2 axes"):
        _check_theta(jnp.ones(3), 2, "Layer")


def test_solver_returning_the_wrong_shape():
    bad = sp.FunctionSolver(lambda t: t[:-1], event_ndim=1)
    with pytest.raises(ValueError, match="same shape"):
        sp.PerturbedOptimizer(bad)(jnp.ones(4), key=jax.random.key(0))


def test_registry():
    assert {"simplex", "topk", "permutahedron"} <= set(sp.list_solvers())
    assert sp.make_solver("topk", k=2) == sp.TopK(2)
    assert isinstance(sp.make_solver("permutahedron"), sp.Permutahedron)
    with pytest.raises(ValueError, match="unknown solver name 'rank'.*permutahedron"):
        sp.make_solver("rank")
    with pytest.raises(ValueError, match="already registered"):
        sp.register_solver("simplex")(sp.Simplex)
    with pytest.raises(TypeError, match="AbstractSolver"):
        sp.register_solver("not-a-solver")(int)

    @sp.register_solver("test_negate_sign")
    def sign(theta):
        return (theta > 0).astype(theta.dtype)

    solver = sp.make_solver("test_negate_sign", event_ndim=1)
    np.testing.assert_allclose(solver.argmax(jnp.array([1.0, -2.0])), [1.0, 0.0])
    opt = sp.PerturbedOptimizer(solver, sp.Normal(), 0.1, num_samples=8)
    assert opt(jnp.ones((2, 3)), key=jax.random.key(0)).shape == (2, 3)
