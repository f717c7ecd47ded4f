"""The perturbed-optimizer layer and its custom-JVP kernel.

Data flow (one place for each step):

    theta (*batch, *event)
      -> `_draw_noise`     Z (B, M, *event)            the one place that samples noise
      -> `_perturb`        theta + eps Z, or theta * exp(eps Z - eps^2 / 2)
      -> `_solve_all`      Y (B, M, *out)               the one place that calls the solver
      -> `_kernel`         y_eps = mean Y, F_eps = mean <theta~, Y>
      -> `_kernel_jvp`     derivatives from the same Z and Y   (the one place for derivatives)
"""

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._noise import (
    AbstractNoise,
    Gumbel,
    has_density,
    has_quantile,
    hypercube_params,
    latin_hypercube,
    Normal,
    orthogonal_normal,
)
from ._sharding import check_mesh, shard_solve
from ._solvers.base import AbstractSolver, exchanges_of, shift_invariant_axes, solve_batch
from ._threefry import fast_threefry_key, is_partitionable_threefry, window_key, written_out


Perturbation = Literal["additive", "multiplicative"]
ControlVariate = Literal[
    "auto", "none", "leave_one_out", "unperturbed", "regression", "covariance"
]
Jacobian = Literal["auto", "conditional", "score"]
_PERTURBATIONS = ("additive", "multiplicative")
_CONTROL_VARIATES = ("auto", "none", "leave_one_out", "unperturbed", "regression", "covariance")
_JACOBIANS = ("auto", "conditional", "score")
# With jacobian="auto", the conditional estimator of a solver whose entries all
# exchange with each other (the ranking) up to this size: O(M d^2) arithmetic against
# the sort's O(M d log d). At d = 100, M = 1000 (`benchmarks/estimators.py --parts
# rankings`): 1.8 (loss on y_eps) and 2.5 (Fenchel-Young) times the score function's
# step on a 2-core CPU, one instance or a batch of 32; on an H200 GPU, 1.1 and 1.9
# times for one instance (`--parts timing`), and more than 2.6 and 3.9 times for a
# batch of 32; for an error 140 to 170 times lower (loss on y_eps). At d = 200 the
# CPU ratios grow to 2.4 and 3.3.
_DENSE_AUTO_MAX = 100
# "regression" stores a d x d matrix per instance; beyond this size, refuse.
_REGRESSION_MAX_SIZE = 4096


class _Config(eqx.Module):
    """Everything the kernel needs besides (theta, sigma, key); never differentiated."""

    solver: AbstractSolver
    noise: AbstractNoise
    num_samples: int = eqx.field(static=True)
    event_ndim: int = eqx.field(static=True)
    perturbation: str = eqx.field(static=True)
    control_variate: str = eqx.field(static=True)
    antithetic: bool = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    mesh: jax.sharding.Mesh | None = eqx.field(default=None, static=True)
    mesh_axes: str | tuple[str, ...] | None = eqx.field(default=None, static=True)
    # Combine the Jacobian estimator with its transpose (exact argmax solvers only).
    symmetric_jacobian: bool = eqx.field(default=False, static=True)
    # Normal noise drawn orthogonal in blocks (see `orthogonal_normal`).
    orthogonal: bool = eqx.field(default=False, static=True)
    # Noise drawn as a Latin hypercube per instance (see `latin_hypercube`).
    stratified: bool = eqx.field(default=False, static=True)
    # Event axes along which the solution is shift-invariant (the solver's
    # `shift_invariant_axes`), used by the Jacobian estimator (`_invariant_free`).
    invariant_axes: tuple[int, ...] = eqx.field(default=(), static=True)
    # The Jacobian of y_eps (`_exchange_sums`) and the gradient of F_eps
    # (`_conditional_shift`) by conditional Monte Carlo, not the score function and
    # the mean of the solutions.
    conditional: bool = eqx.field(default=False, static=True)


def _draw_noise(
    cfg: _Config, key: PRNGKeyArray, batch: int, event_shape, dtype, window=None
) -> Array:
    """Noise Z of shape (batch, M, *event); instance i's noise depends only on `key`
    and i, so it is the same whatever the batch size, chunking or device count.

    With an `elementwise` noise and a Threefry key under JAX's default partitionable
    Threefry, the whole array is one draw: each entry then depends only on the key
    and its index, and as the batch is the leading axis, instance i's entries have
    the same indices for any batch size (one random-number kernel to compile instead
    of two). Otherwise instance i draws from `jax.random.fold_in(key, i)`; with
    `orthogonal`, its M (or M/2 antithetic) samples are orthogonal in blocks. With
    `stratified`, they are a Latin hypercube (`_stratified_noise`), drawn the same way.

    Threefry keys draw their bits through `fast_threefry_key`: the same numbers as
    with `key` itself, in one fused kernel instead of JAX's CPU loop. With `window`
    = (start, count), a one-draw noise gives only samples start..start+count-1 of
    each instance (`window_key`; see `_streamed_sums`), shape (batch, count, *event),
    or twice count with antithetic pairs; so does a stratified noise.
    """
    m = _independent(cfg, cfg.num_samples)
    if cfg.stratified:
        z = _stratified_noise(cfg, key, batch, event_shape, dtype, window)
    elif window is not None:
        start, count = window
        key = window_key(key, start, batch, m, count, math.prod(event_shape))
        z = cfg.noise.sample(key, (batch, count, *event_shape), dtype)
    elif not cfg.orthogonal and _one_draw(cfg.noise, key):
        z = cfg.noise.sample(fast_threefry_key(key), (batch, m, *event_shape), dtype)
    else:
        key = fast_threefry_key(key)
        if cfg.orthogonal:
            draw = lambda k: orthogonal_normal(k, m, event_shape, dtype)
        else:
            draw = lambda k: cfg.noise.sample(k, (m, *event_shape), dtype)
        z = jax.vmap(draw)(_instance_keys(key, batch))
    return jnp.concatenate([z, -z], axis=1) if cfg.antithetic else z


def _instance_keys(key: PRNGKeyArray, batch: int) -> Array:
    """fold_in(key, i) for the instances i of the batch."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def _stratified_noise(
    cfg: _Config, key: PRNGKeyArray, batch: int, event_shape, dtype, window=None
) -> Array:
    """The Latin hypercube of each instance (`latin_hypercube`), (batch, count,
    *event): all M samples, or those of `window` = (start, count) (padding past M
    repeats samples). Its uniform numbers and the coordinates' permutations are one
    draw each with a partitionable Threefry key (batch-size independent, as for
    independent draws, and a window draws its slice with `window_key`); otherwise
    instance i draws them from `jax.random.fold_in(key, i)`."""
    m = _independent(cfg, cfg.num_samples)
    size = math.prod(event_shape)
    work = jnp.promote_types(dtype, jnp.float32)
    start, count = window if window is not None else (jnp.zeros((), jnp.uint32), m)

    def draws(key, lead):
        key_u, key_p = jax.random.split(key)
        if window is None:
            key_u = fast_threefry_key(key_u)
        else:
            key_u = window_key(key_u, start, batch, m, count, size)
        u = jax.random.uniform(key_u, (*lead, count, size), work)
        return u, hypercube_params(fast_threefry_key(key_p), (*lead, size), m)

    if is_partitionable_threefry(key):
        u, params = draws(key, (batch,))
    else:
        assert window is None  # (streaming needs a partitionable key: `_streams`)
        u, params = jax.vmap(lambda k: draws(k, ()))(_instance_keys(key, batch))
    index = (start + jnp.arange(count, dtype=jnp.uint32)) % m
    z = latin_hypercube(cfg.noise, u, params, index, m)
    return z.reshape(batch, count, *event_shape).astype(dtype)


def _one_draw(noise: AbstractNoise, key: PRNGKeyArray) -> bool:
    """Whether one draw of the whole noise array is batch-size independent."""
    return type(noise).elementwise and is_partitionable_threefry(key)


def _perturb(cfg: _Config, theta: Array, sigma: Array, z: Array) -> Array:
    """theta (B, *event), z (B, M, *event) -> perturbed objectives (B, M, *event)."""
    theta = theta[:, None]
    if cfg.perturbation == "additive":
        return theta + sigma * z
    return theta * jnp.exp(sigma * z - sigma**2 / 2)


def _solver_input(perturbed: Array, key: PRNGKeyArray) -> Array:
    """The perturbed inputs, written out before the solver reads them (on the CPU;
    `written_out`). Otherwise XLA may fuse the noise into the solver's kernels: into
    an argmax, a reduction that it evaluates entry by entry, the noise's transform
    (and a stratified noise's shuffle) then runs in that slow loop. A forward-only
    call of the simplex layer (d = 100, M = 1000, 2-core CPU) took 1.46 ms with
    independent draws and 3.45 ms stratified, 0.61 and 1.02 ms with the boundary."""
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    word = data.reshape(-1)[0].astype(jnp.uint32)
    return jax.lax.platform_dependent(
        perturbed, cpu=lambda x: written_out(x, word), default=lambda x: x
    )


def _solve_all(cfg: _Config, thetas: Array) -> Array:
    """Solve a stack (N, *event) in one pass: split over the devices of `cfg.mesh` if
    set (see `_sharding.py`), each device in chunks of `chunk_size` if set."""
    if cfg.mesh is not None:
        return shard_solve(_solve_local, cfg, thetas, cfg.mesh, cfg.mesh_axes)
    return _solve_local(cfg, thetas)


def _solve_local(cfg: _Config, thetas: Array) -> Array:
    """Solve a stack (N, *event) on one device, in chunks of `chunk_size` if set."""
    n = thetas.shape[0]
    chunk = cfg.chunk_size
    if chunk is None or chunk >= n:
        return solve_batch(cfg.solver, thetas)
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    # Pad by repeating the first instance, a valid input for every solver.
    padded = jnp.concatenate([thetas, jnp.broadcast_to(thetas[:1], (pad, *thetas.shape[1:]))])
    chunks = padded.reshape(num_chunks, chunk, *thetas.shape[1:])
    ys = jax.lax.map(lambda c: solve_batch(cfg.solver, c), chunks)
    return ys.reshape(num_chunks * chunk, *ys.shape[2:])[:n]


def _forward(cfg: _Config, theta: Array, sigma: Array, key: PRNGKeyArray, written=False):
    """Draw, perturb and solve once. theta is (B, *event). With `written`, the perturbed
    inputs are written out before the solve (`_solver_input`; for a forward-only call,
    where nothing else reads them)."""
    b = theta.shape[0]
    event_shape = theta.shape[1:]
    m = cfg.num_samples
    z = _draw_noise(cfg, key, b, event_shape, theta.dtype)
    perturbed = _perturb(cfg, theta, sigma, z)
    if written:
        perturbed = _solver_input(perturbed, key)
    stack = perturbed.reshape(b * m, *event_shape)
    if cfg.control_variate == "unperturbed" and not cfg.antithetic:
        stack = jnp.concatenate([stack, theta])
    y = _solve_all(cfg, stack).astype(theta.dtype)
    y_pert = y[: b * m].reshape(b, m, *y.shape[1:])
    y_plain = y[b * m :] if y.shape[0] > b * m else None
    return z, perturbed, y_pert, y_plain


def _flat(x: Array) -> Array:
    """(B, M, *shape) -> (B, M, D): one row of D numbers per sample."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _reduce(theta_shape, perturbed: Array, y: Array):
    """y_eps = mean_m Y_m (B, *out) and F_eps = mean_m <theta~_m, Y_m> (B,)."""
    y_eps = jnp.mean(y, axis=1)
    if y.shape[2:] == theta_shape[1:]:
        f_eps = jnp.einsum("bmd,bmd->b", _flat(perturbed), _flat(y)) / y.shape[1]
    else:  # a general function (perturbations.make_perturbed_fun): no max value
        f_eps = jnp.zeros(theta_shape[:1], y.dtype)
    return y_eps, f_eps


def _pairs(x: Array) -> Array:
    """Antithetic samples (Z_1..Z_h, -Z_1..-Z_h) along axis 1 -> the h pair means."""
    h = x.shape[1] // 2
    return (x[:, :h] + x[:, h:]) / 2


class _Terms(NamedTuple):
    """What the Jacobian estimator of y_eps needs, from one set of samples.

    With c_m = y_m - b_m and the score directions g_m = W^-1 grad nu(Z_m) / sigma
    (also divided by theta for the multiplicative perturbation), the estimator is

        J t = alpha * mean_m c_m <g_m, t>  +  (1 - alpha) * mean_m g_m <c_m, t>

    (the second term, the transposed estimator, only when `alpha` is not None). W is
    the identity except with the regression control variate (see `_whitening`). With
    the covariance control variate, g_m is replaced by the corrected score of
    `_covariance_scores`, applied without forming it (`moment` and `gram` hold its
    weights).
    """

    centred: Array  # (B, M, Do)  c_m = y_m - b_m
    grad_nu: Array  # (B, M, D)   grad nu(Z_m), for the sigma-derivative
    scores: Array  # (B, M, D)    W^-1 grad nu(Z_m), for the theta-derivative
    alpha: Array | None  # (B, Do) weight of the plain estimator per output coordinate
    moment: Array | None = None  # (B, M) 1 + k_m of `_covariance_scores`
    gram: Array | None = None  # (B, blocks, k, k) its within-block part (`_block_gram`)


def _jacobian_terms(cfg: _Config, theta: Array, z: Array, y: Array, y_plain) -> _Terms:
    """The control variate, the noise scores and the symmetrisation weights."""
    m = y.shape[1]
    yf = _flat(y)
    centred = _centring(cfg, m, jnp.sum(yf, axis=1), y_plain)(yf)
    alpha = None
    if _symmetrised(cfg) and y.shape[2:] == theta.shape[1:]:
        # The Jacobian of y_eps is the Hessian of F_eps, hence symmetric, so
        # the plain estimator (row i: noise from all d coordinates of grad nu,
        # variance ~ d s_i^2) and its transpose (row i: variance ~ sum_j s_j^2)
        # are both unbiased; weight them by inverse variance per output coordinate,
        # with s_i^2 the sample variance of y_i.
        alpha = _symmetry_weights(jnp.var(yf, axis=1))
    gn = _flat(cfg.noise.grad_nu(z))
    scores = gn
    n_eff = _independent(cfg, m)
    if cfg.control_variate == "regression" and m > 1:
        scores = jnp.einsum("bij,bmj->bmi", _whitening(gn, n_eff), gn)
    moment = gram = None
    if _covariance_applies(cfg, m, gn.shape[-1]):
        moment = _moment(cfg, scores, m, theta.shape[1:])
        gram = _block_gram(cfg, scores, m, theta.shape[1:])
    return _Terms(centred, gn, scores, alpha, moment, gram)


def _invariant_free(cfg: _Config, x: Array, event_shape) -> Array:
    """x (..., D) without its components along the directions in which the solver is
    shift-invariant (`cfg.invariant_axes`): each axis centred in turn, the orthogonal
    projection P onto what the solution can depend on.

    The solution ignores those directions, so J (I - P) = 0, and for an exact argmax
    J = J^T gives (I - P) J = 0 too. Hence the estimator uses the projected scores P g
    (which turns the plain estimate into J^ P: unbiased for any noise, as E[J^] P = J
    P = J; with Normal noise a Rao-Blackwellisation, as P Z and (I - P) Z are
    independent and y depends on P Z only), and projects the symmetrised estimate. A
    projection onto a subspace that holds the truth never lengthens the error of the
    estimate it is applied to. As <P g, u> = <g, P u>, `_jacobian_tangent` applies P
    to the tangents (B, D) rather than to the scores (B, M, D); only the covariance
    control variate's |P g|^2 (`_moment`) and `stats` project scores. The covariance
    control variate works unchanged on projected scores (E[P g g^T P] = P)."""
    if not cfg.invariant_axes:
        return x
    y = x.reshape(*x.shape[:-1], *event_shape)
    for axis in cfg.invariant_axes:
        y = y - jnp.mean(y, axis=axis, keepdims=True)
    return y.reshape(x.shape)


def _centring(cfg: _Config, m: int, y_sum: Array, y_plain) -> Callable[[Array], Array]:
    """y -> c = y - b for a block of samples y (B, k, Do), from the sum of all M
    solutions (B, Do) (and y*(theta) (B, *out) for "unperturbed"): the control
    variate b_m, independent of the m-th noise, so it adds no bias (the score has
    mean zero). With antithetic pairs (a block holds k/2 samples, then their
    partners), any baseline shared by a pair cancels from the theta-derivative; the
    leave-one-pair-out mean still reduces the variance of the sigma-derivative (whose
    score is even in Z)."""
    if cfg.control_variate == "none" or m == 1 or (cfg.antithetic and m < 4):
        return lambda y: y
    if cfg.antithetic:
        def centre(y):
            pair = _pairs(y)
            loo = (y_sum[:, None] / 2 - pair) / (m // 2 - 1)
            return y - jnp.concatenate([loo, loo], axis=1)

        return centre
    if cfg.control_variate == "unperturbed":
        assert y_plain is not None
        return lambda y: y - y_plain.reshape(y_plain.shape[0], 1, -1)
    # leave-one-out, also for "regression" and "covariance":
    # y_m - mean of the others = M/(M-1) (y_m - mean)
    return lambda y: (y - y_sum[:, None] / m) * (m / (m - 1))


def _symmetrised(cfg: _Config) -> bool:
    """Whether the Jacobian estimate is combined with its transpose (an argmax layer
    with the additive perturbation, whose y_eps is a gradient; see `_jacobian_terms`)."""
    return cfg.symmetric_jacobian and cfg.perturbation == "additive"


def _independent(cfg: _Config, m: int) -> int:
    """How many independent draws m samples hold: m, or m / 2 antithetic pairs."""
    return m // 2 if cfg.antithetic else m


def _block(cfg: _Config, d: int) -> int:
    """The size of the groups of dependent draws: with `orthogonal`, the blocks of
    min(N, d) orthogonal samples (`orthogonal_normal`, N = the layer's independent
    draws); otherwise 1. Fixed by the layer, so a subset of whole blocks (the
    jackknife of `stats`) keeps the same blocks."""
    return min(_independent(cfg, cfg.num_samples), d) if cfg.orthogonal else 1


def _covariance_weights(cfg: _Config, m: int, d: int) -> tuple[float, float]:
    """(beta, r) of the covariance control variate for the n independent draws among
    m samples of d coordinates, in groups of k (`_block`): the shrinkage beta = n / (n
    + d) and r = beta n / (n - k).

    The control variate's own error grows with d / n (P has d^2 entries estimated from
    n draws), so its weight shrinks from 1 when n >> d toward 0 when d >> n. beta is
    fixed by the sizes, not fitted to the samples, so the estimator stays unbiased."""
    n = _independent(cfg, m)
    beta = n / (n + d)
    return beta, beta * n / (n - _block(cfg, d))


def _covariance_applies(cfg: _Config, m: int, d: int) -> bool:
    """Whether the covariance control variate is used: at least two groups of draws."""
    return cfg.control_variate == "covariance" and _independent(cfg, m) > _block(cfg, d)


def _moment(cfg: _Config, gn: Array, m: int, event_shape) -> Array:
    """1 + k_m (B, k) of `_covariance_scores` for a block of scores gn (B, k, D) among
    m samples: k_m = beta (|P g_m|^2 - s_m) / (n - k), P of `_invariant_free`, with s_m
    the size of the group of sample m (1 unless `orthogonal`; see `_block`)."""
    d = gn.shape[-1]
    beta, _ = _covariance_weights(cfg, m, d)
    norm2 = jnp.sum(_invariant_free(cfg, gn, event_shape) ** 2, axis=-1)
    k, n = _block(cfg, d), _independent(cfg, m)
    sizes = 1
    if k > 1:  # the last block may be partial
        index = jnp.arange(gn.shape[1]) % n
        sizes = jnp.minimum(k, n - index // k * k).astype(gn.dtype)[None]
    return 1 + beta * (norm2 - sizes) / (n - k)


def _block_gram(cfg: _Config, gn: Array, m: int, event_shape) -> Array | None:
    """With `orthogonal` and the covariance control variate: beta / (n - k) times the
    Gram matrices (B, blocks, k, k) of the projected scores P g within each block of
    orthogonal draws, diagonal zeroed (it is in `_moment`); None otherwise. The blocks'
    scores are orthogonal, so this vanishes unless the solver is shift-invariant."""
    d = gn.shape[-1]
    k, n = _block(cfg, d), _independent(cfg, m)
    if k == 1 or not cfg.invariant_axes:
        return None
    beta, _ = _covariance_weights(cfg, m, d)
    blocks = -(-n // k)
    g = _invariant_free(cfg, gn[:, :n], event_shape)
    g = jnp.pad(g, ((0, 0), (0, blocks * k - n), (0, 0))).reshape(g.shape[0], blocks, k, d)
    gram = jnp.einsum("bnid,bnjd->bnij", g, g) * (1 - jnp.eye(k, dtype=g.dtype))[None, None]
    return gram * (beta / (n - k))


def _apply_moment(cfg: _Config, moment: Array, gram: Array | None, x: Array) -> Array:
    """K x (B, M, ...) for per-sample values x (B, M, ...): the weights of the covariance
    control variate's corrected scores on the raw ones (`_covariance_scores`), the
    diagonal `moment` plus, for orthogonal blocks, the within-block `gram` (applied to
    each half of antithetic samples, whose blocks have the same Gram matrices)."""
    weighted = moment.reshape(moment.shape + (1,) * (x.ndim - 2)) * x
    if gram is None:
        return weighted
    b, blocks, k, _ = gram.shape
    halves = 2 if cfg.antithetic else 1
    n = x.shape[1] // halves
    xh = x.reshape(b, halves, n, -1)
    xh = jnp.pad(xh, ((0, 0), (0, 0), (0, blocks * k - n), (0, 0)))
    off = jnp.einsum("bnij,bhnjr->bhnir", gram, xh.reshape(b, halves, blocks, k, -1))
    off = off.reshape(b, halves, blocks * k, -1)[:, :, :n]
    return weighted + off.reshape(x.shape)


def _outer_sum(gn: Array, v: Array) -> Array:
    """sum_m g_m <g_m, v> (B, D) over a block of scores gn (B, k, D), in O(k D)."""
    return jnp.einsum("bmd,bm->bd", gn, jnp.einsum("bmd,bd->bm", gn, v))


def _apply_p(gn: Array, v: Array) -> Array:
    """P v (B, D) with P = mean_m g_m g_m^T - I, the scores' second moment minus its
    expectation, without forming it: O(M D)."""
    return _outer_sum(gn, v) / gn.shape[1] - v


def _covariance_scores(
    cfg: _Config, gn: Array, moment: Array, block_gram: Array | None
) -> Array:
    """The corrected scores (B, M, D) of the covariance control variate, formed
    explicitly (for `stats`): g'_m = (1 + k_m) g_m (plus, with orthogonal blocks, the
    within-block term `block_gram` of `_block_gram`) - r P g_m (`_moment`,
    `_covariance_weights`). Scores of Gumbel and Normal noise have E[g g^T] = I, so P
    has mean zero; -n/(n-k) J P is the leave-one-out (with blocks of k orthogonal
    samples, leave-one-block-out) estimate of the linear part of the estimator's
    error, J (sample second moment - I), with J estimated from the other samples or
    blocks (so no bias), and the k_m and block terms are what leaving each one out
    adds; all are weighted by beta.

    Formed through a D x D or an M x M matrix, whichever is smaller."""
    b, m, d = gn.shape
    if d <= m:
        second = jnp.einsum("bmi,bmj->bij", gn, gn) / m
        p_g = jnp.einsum("bij,bmj->bmi", second, gn) - gn
    else:
        gram = jnp.einsum("bmd,bkd->bmk", gn, gn) / m
        p_g = jnp.einsum("bmk,bkd->bmd", gram, gn) - gn
    corrected = _apply_moment(cfg, moment, block_gram, gn)
    return corrected - _covariance_weights(cfg, m, d)[1] * p_g


def _symmetry_weights(s2: Array) -> Array:
    """alpha (B, D) from the sample variances s2 (B, D) of the solutions' coordinates:
    S / (S + D s2_i), with S = sum_i s2_i (1 where both vanish)."""
    total = jnp.sum(s2, axis=-1, keepdims=True)
    den = total + s2.shape[-1] * s2
    return jnp.where(den > 0, total / jnp.where(den > 0, den, 1), 1)


def _whitening(gn: Array, n_eff: int) -> Array:
    """W^-1 (B, D, D) for the regression control variate.

    The least-squares fit of the solutions on the scores g = grad nu(Z) gives the
    Jacobian estimate  mean_m c_m g_m^T  G^-1 k / sigma, with G the sample covariance
    of the scores and k = tr(G) / d (estimating the Fisher information E[g_i^2] of one
    coordinate; 1 for Normal and Gumbel). Using the sample G instead of its known
    expectation k I is a control variate: exact for solutions linear in the noise,
    consistent in general, with a bias of order d / M. W = (1 - s) G / k + s I, with
    s = d / (d + 4 n_eff) (n_eff independent draws) shrinking toward the plain
    estimator when the samples are few for the dimension.
    """
    gc = gn - jnp.mean(gn, axis=1, keepdims=True)
    return _whitening_of(jnp.einsum("bmi,bmj->bij", gc, gc) / gn.shape[1], n_eff)


def _whitening_of(cov: Array, n_eff: int) -> Array:
    """W^-1 of `_whitening` from the sample covariance G (B, D, D) of the scores."""
    d = cov.shape[-1]
    k = jnp.trace(cov, axis1=1, axis2=2)[:, None, None] / d
    k = jnp.where(k > 0, k, 1)
    s = d / (d + 4 * n_eff)
    return jnp.linalg.inv((1 - s) * cov / k + s * jnp.eye(d, dtype=cov.dtype)[None])


def _score_scale(gn: Array) -> Array:
    """k = tr(G) / d (B, 1, 1): the mean sample variance of the scores (nonzero)."""
    k = jnp.mean(jnp.var(gn, axis=1), axis=-1)[:, None, None]
    return jnp.where(k > 0, k, 1)


def _max_grad_sums(cfg: _Config, sigma: Array, z: Array, perturbed: Array, y: Array):
    """Sums over the samples (axis 1) of the pathwise derivatives of <theta~_m, y_m>,
    which are <y_m, d theta~_m> (envelope theorem): in theta (B, D), in sigma (B,)."""
    yf, zf = _flat(y), _flat(z)
    if cfg.perturbation == "multiplicative":
        d_theta = jnp.exp(sigma * zf - sigma**2 / 2)  # d theta~ / d theta
        return (
            jnp.einsum("bmd,bmd->bd", yf, d_theta),
            jnp.einsum("bmd,bmd->b", yf, _flat(perturbed) * (zf - sigma)),  # d / d sigma
        )
    return jnp.sum(yf, axis=1), jnp.einsum("bmd,bmd->b", yf, zf)


def _jacobian_sums(
    cfg: _Config, sigma, z, c, gn, gs, u, t, t_sigma, transposed: bool, moment=None, rp_u=None,
    gram=None,
):
    """Sums over the samples (axis 1) of the Jacobian estimator's terms along the
    tangents (see `_Terms`), each (B, D), zero where a tangent is None: the plain
    estimator sum_m c_m <g_m, u> and its transpose sum_m g_m <c_m, t> (u = t, or t /
    theta for the multiplicative perturbation), and the sigma-derivative's
    sum_m c_m score_m * t_sigma; all still to be divided by M sigma.

    With `moment` (the covariance control variate; and `gram` for orthogonal blocks,
    see `_apply_moment`), g_m is the corrected score of `_covariance_scores`, applied
    through P v in O(M D): `rp_u` = r P u is given, and
    the transposed sum still lacks - r P w, with w = sum_m g_m <c_m, t>, the fourth
    value (None otherwise); see `_jacobian_tangent`."""
    zeros = jnp.zeros((c.shape[0], c.shape[-1]), c.dtype)
    plain = trans = by_sigma = zeros
    w = None
    if t is not None:
        s = jnp.einsum("bmd,bd->bm", gs, u)
        if moment is not None:  # <g'_m, u> = (K <g, u>)_m - r <g_m, P u>
            s = _apply_moment(cfg, moment, gram, s) - jnp.einsum("bmd,bd->bm", gs, rp_u)
        plain = jnp.einsum("bmo,bm->bo", c, s)
        if transposed:
            ct = jnp.einsum("bmo,bo->bm", c, t)
            if moment is None:
                trans = jnp.einsum("bmd,bm->bd", gs, ct)
            else:  # sum_m g_m (K <c, t>)_m (K symmetric), and w
                trans = jnp.einsum("bmd,bm->bd", gs, _apply_moment(cfg, moment, gram, ct))
                w = jnp.einsum("bmd,bm->bd", gs, ct)
    if t_sigma is not None:
        by_sigma = t_sigma * jnp.einsum("bmo,bm->bo", c, _sigma_score(cfg, sigma, z, gn))
    return plain, trans, by_sigma, w


def _sigma_score(cfg: _Config, sigma, z: Array, gn: Array) -> Array:
    """sigma d log density(theta~_m) / d sigma (B, k) for the noise z (B, k, *event)
    and its grad nu gn (B, k, D): <g, z> - D (additive).

    With Normal noise (g = z) and a shift-invariant solver, |Z|^2 - D = (|P Z|^2 -
    rank P) + (|(I - P) Z|^2 - (D - rank P)), and the second part is independent of
    the solution and has mean zero: it is dropped (a Rao-Blackwellisation, as for the
    scores in `_invariant_free`)."""
    zf = _flat(z)
    if type(cfg.noise) is Normal and cfg.invariant_axes:
        ndim = z.ndim - 2
        rank = math.prod(
            n - 1 if i - ndim in cfg.invariant_axes else n for i, n in enumerate(z.shape[2:])
        )
        return jnp.einsum("bmd,bmd->bm", _invariant_free(cfg, zf, z.shape[2:]), zf) - rank
    score = jnp.einsum("bmd,bmd->bm", gn, zf) - gn.shape[-1]
    if cfg.perturbation == "multiplicative":
        score = score - sigma * jnp.sum(gn, axis=-1)
    return score


def _jacobian_tangent(
    cfg: _Config, m: int, sums_of, alpha, u, event_shape, apply_p=None
) -> Array:
    """d y_eps (times M sigma): `sums_of(u, rp_u)` gives the sums of `_jacobian_sums`
    over the m samples along u. With the covariance control variate (`apply_p`: v ->
    P v, over the same samples), P is applied to u before and to the transposed sum
    after.

    With Q the projection of `_invariant_free` (why: see there), the projected scores
    are applied through the tangents: <Q g, u> = <g, Q u>, the transposed sum of Q g_m
    is Q of the sum over raw scores, and P of the projected scores is Q P Q. The
    symmetrised estimate is then projected by Q too."""
    project = lambda x: _invariant_free(cfg, x, event_shape)
    rp_u = r = None
    if u is not None:
        u = project(u)
        if apply_p is not None:
            r = _covariance_weights(cfg, m, u.shape[-1])[1]
            rp_u = r * project(apply_p(u))
    plain, trans, by_sigma, w = sums_of(u, rp_u)
    if w is not None:  # (only with the covariance control variate: apply_p is set)
        assert apply_p is not None and r is not None
        trans = trans - r * apply_p(project(w))
    if alpha is not None:
        plain = project(alpha * plain + (1 - alpha) * project(trans))
    return plain + by_sigma


# Exchange levels held at once when every entry exchanges with every other one (the
# ranking's d x d levels per sample): blocks of samples keep the temporaries near
# this many entries instead of batch x M x d x d. Larger on accelerators, where each
# block is a few kernel launches: on an H200, a batch of 32 rankings of 100 items (M
# = 1000) took 6.4 ms per step with 2^20, 2.2 ms with 2^22 and 3.1 ms with 2^24 (each
# with about 0.3 ms of making a key in the timed call).
_DENSE_BLOCK_ENTRIES_CPU = 2**20
_DENSE_BLOCK_ENTRIES_ACCELERATOR = 2**22


def _dense_block_entries() -> int:
    """The block size for the default backend (blocks change rounding only)."""
    if jax.default_backend() == "cpu":
        return _DENSE_BLOCK_ENTRIES_CPU
    return _DENSE_BLOCK_ENTRIES_ACCELERATOR


def _dense_exchanges(solver: AbstractSolver, event_shape, dtype) -> bool:
    """Whether the solver's partners are "every entry" (`exchanges` returns None)."""
    hook = exchanges_of(solver)
    assert hook is not None
    x = jax.ShapeDtypeStruct(tuple(event_shape), dtype)
    return jax.eval_shape(hook, x, x)[1] is None


def _sample_blocks(f, perturbed: Array, y: Array, keep, per_sample: bool = False):
    """f(perturbed, y, keep) over blocks of the samples (axis 1) of (B, k, ...) arrays,
    about `_dense_block_entries()` / (B D) samples of D x D levels each: the results
    summed (a pytree of sums), or with `per_sample`, joined along axis 1 (B, k, ...).
    The last block is padded with repeats of the first sample, masked by `keep`."""
    b, k = perturbed.shape[:2]
    d = math.prod(perturbed.shape[2:])
    size = max(1, min(k, _dense_block_entries() // max(1, b * d * d)))
    keep = jnp.ones((k,), perturbed.dtype) if keep is None else keep
    if size == k:
        return f(perturbed, y, keep)
    n = -(-k // size)
    pad = n * size - k

    def blocks(x):
        x = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (b, pad, *x.shape[2:]))], axis=1)
        return jnp.moveaxis(x.reshape(b, n, size, *x.shape[2:]), 1, 0)

    keeps = jnp.concatenate([keep, jnp.zeros((pad,), keep.dtype)]).reshape(n, size)
    xs = (blocks(perturbed), blocks(y), keeps)
    if per_sample:
        out = jax.lax.map(lambda a: f(*a), xs)  # (n, B, size, ...)
        out = jnp.moveaxis(out, 0, 1)
        return out.reshape(b, n * size, *out.shape[3:])[:, :k]
    init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                        jax.eval_shape(lambda a: f(*a), jax.tree.map(lambda x: x[0], xs)))
    return jax.lax.scan(lambda acc, a: (jax.tree.map(jnp.add, acc, f(*a)), None), init, xs)[0]


def _sample_sum(x: Array) -> Array:
    """The sum of x (B, k, ...) over its samples (axis 1), as a product with a vector of
    ones: XLA's CPU reduction over that middle axis took about 10 ns per entry on
    (1, 8, 100, 100) blocks, 12 times the time of the densities it sums."""
    ones = jnp.ones((x.shape[1],), x.dtype)
    return jnp.einsum("bk...,k->b...", x, ones)


def _exchange_levels(cfg: _Config, theta: Array, perturbed: Array, y: Array):
    """The solver's `exchanges` for a block of samples (B, k, *event) and their
    solutions: levels (B, k, D, K) and partners (None, or the solver's (slots,
    pivots) with leading axes B * k)."""
    b, k = perturbed.shape[:2]
    event = theta.shape[1:]
    hook = exchanges_of(cfg.solver)
    assert hook is not None
    levels, partners = jax.vmap(hook)(
        perturbed.reshape(b * k, *event), y.reshape(b * k, *y.shape[2:])
    )
    return levels.reshape(b, k, math.prod(event), -1).astype(theta.dtype), partners


def _exchange_weights(cfg: _Config, theta: Array, sigma, perturbed: Array, y: Array, keep):
    """(w, z, partners) of the conditional estimator (`_exchange_sums`) for a block of
    samples (B, k, *event): w and z (B, k, D, K); partners None (partner k is entry k)
    or (slots (B, k, D, K), pivots (B, k, P)): the partner of [i, k] is
    pivots[slots[i, k]] (see `AbstractSolver`); `keep` (k,) zeroes the padding's
    weights, or None."""
    b, k = perturbed.shape[:2]
    d = math.prod(theta.shape[1:])
    levels, partners = _exchange_levels(cfg, theta, perturbed, y)
    z = (levels - theta.reshape(b, 1, d, 1)) / sigma
    finite = jnp.isfinite(z)
    z = jnp.where(finite, z, 0)
    w = jnp.where(finite, getattr(cfg.noise, "density")(z), 0) / sigma
    if keep is not None:
        w = w * keep.reshape(1, k, 1, 1)
    if partners is not None:
        slots, pivots = partners
        partners = (slots.reshape(w.shape), pivots.reshape(b, k, -1))
    return w, z, partners


def _conditional_shift(cfg: _Config, theta: Array, sigma, perturbed: Array, y: Array, keep):
    """Sum over a block of samples (B, k, *event) of E[y_mi | Z_m,-i] - y_mi (B, D):
    what turns the solutions' mean into the conditional Monte-Carlo estimate of
    y_eps, used for the gradient of F_eps (the Fenchel-Young gradient). Entry i of a
    sample counts one unit per exchange level it is above (`exchanges`); over its own
    noise it is above level t with probability 1 - cdf((t - theta_i) / sigma).
    Unbiased, and exact along each entry's own noise. Not used for the layer's
    values, which stay the mean of the solutions (a point of their convex hull)."""
    b = theta.shape[0]
    event = theta.shape[1:]
    d = math.prod(event)
    cdf = getattr(cfg.noise, "cdf")

    def shift_sum(perturbed, y, keep):
        k = perturbed.shape[1]
        levels, partners = _exchange_levels(cfg, theta, perturbed, y)
        x = perturbed.reshape(b, k, d, 1)
        above = (x > levels).astype(theta.dtype)
        shift = jnp.sum(1 - cdf((levels - theta.reshape(b, 1, d, 1)) / sigma) - above, -1)
        if partners is None:  # entry i's level with itself, x_i: not an exchange
            shift = shift - (1 - cdf((x[..., 0] - theta.reshape(b, 1, d)) / sigma))
        if keep is not None:
            shift = shift * keep.reshape(1, k, 1)
        return jnp.sum(shift, axis=1)

    if _dense_exchanges(cfg.solver, event, theta.dtype):
        total = _sample_blocks(shift_sum, perturbed, y, keep)
    else:
        total = shift_sum(perturbed, y, keep)
    # Along the solver's invariant directions the solutions' sums are fixed, so the
    # mean of the solutions is exact there: keep it (unbiased, lower variance).
    return _invariant_free(cfg, total, event)


def _at_slots(values: Array, slots: Array) -> Array:
    """values[b, m, slots[b, m, i, k]] for values (B, M, P) at a few pivots and slots
    (B, M, D, K): a chain of selects, which XLA fuses with its neighbours. (A one-hot
    mask of shape (B, M, D, K, P) summed over P cost more than the rest of the
    conditional step on the CPU: XLA's reduction over a trailing axis of size 2.)"""
    at = lambda p: values[:, :, p, None, None]
    out = jnp.broadcast_to(at(0), slots.shape)
    for p in range(1, values.shape[-1]):
        out = jnp.where(slots == p, at(p), out)
    return out


def _per_pivot(x: Array, slots: Array, num: int) -> Array:
    """(B, M, num) sums of x (B, M, D, K) over the entries and levels in each pivot
    slot: one masked sum per pivot, whose transpose (reverse mode) is a chain of
    selects as in `_at_slots`."""
    return jnp.stack([jnp.sum(jnp.where(slots == p, x, 0), axis=(2, 3)) for p in range(num)], -1)


def _exchange_sums(
    cfg: _Config, theta: Array, sigma, perturbed: Array, y: Array, keep, u, want_sigma: bool
):
    """Sums over a block of samples (B, k, *event) of the conditional Monte-Carlo
    estimates of d y_eps along the tangent u (B, D) (None: zeros) and along sigma
    (B, D) (zeros unless `want_sigma`); `keep` (k,) masks padding, or None.

    The solver's `exchanges` lists, for sample m and entry i, the levels t_mik of
    theta~_i, set by the other entries, where the solution gains e_i - e_p (p =
    partner). Over entry i's own noise alone (the others fixed), the solution's mean
    is then  sum_k (e_i - e_p) P(theta_i + sigma Z_i > t_mik)  + terms free of
    theta_i, whose derivatives are closed-form: with z = (t - theta_i) / sigma and w =
    density(z) / sigma,

        d / d theta_i:  sum_k w (e_i - e_p),     d / d sigma:  sum_i sum_k w z (e_i - e_p).

    Each sample's noise of the other entries has its true law (also with antithetic,
    orthogonal or stratified draws), so the estimate is unbiased; it is exact along
    each entry's own noise, which is most of the score function's error. Levels of
    -inf or +inf (no exchange) add nothing."""
    b = theta.shape[0]
    d = math.prod(theta.shape[1:])
    zeros = jnp.zeros((b, d), theta.dtype)
    if _dense_exchanges(cfg.solver, theta.shape[1:], theta.dtype):
        # partner k is entry k: sum over the samples first

        def weight_sums(p, y, keep):  # (B, D, D) each, for a block of samples
            w, z, _ = _exchange_weights(cfg, theta, sigma, p, y, keep)
            return _sample_sum(w), (_sample_sum(w * z) if want_sigma else None)

        a, az = _sample_blocks(weight_sums, perturbed, y, keep)
        jt = zeros if u is None else jnp.sum(a, -1) * u - jnp.einsum("bik,bi->bk", a, u)
        by_sigma = zeros if az is None else jnp.sum(az, -1) - jnp.sum(az, -2)
        return jt, by_sigma
    w, z, partners = _exchange_weights(cfg, theta, sigma, perturbed, y, keep)
    assert partners is not None
    slots, pivots = partners

    def spread(x):  # sum_m,i,k x_mik (e_i - e_p), (B, D): what each pivot hands over
        handed = _per_pivot(x, slots, pivots.shape[-1])  # (B, k, P)
        lost = jax.vmap(lambda p, v: jnp.zeros((d,), v.dtype).at[p].add(v))(
            pivots.reshape(b, -1), handed.reshape(b, -1)
        )
        return jnp.sum(x, axis=(1, 3)) - lost

    jt = zeros if u is None else spread(w * u.reshape(b, 1, d, 1))
    by_sigma = spread(w * z) if want_sigma else zeros
    return jt, by_sigma


def _conditional_tangent(cfg: _Config, sums_of, t, t_sigma, event_shape) -> Array:
    """d y_eps (times M) from `sums_of(u, want_sigma)` = the sums of `_exchange_sums`
    over all samples, for the tangents t (B, D) (or None) and t_sigma. The projection
    of `_invariant_free` is applied to the tangent and to the result (J = Q J Q)."""
    project = lambda x: _invariant_free(cfg, x, event_shape)
    u = None if t is None else project(t)
    jt, by_sigma = sums_of(u, t_sigma is not None)
    d_y = project(jt) if u is not None else jnp.zeros_like(jt)
    if t_sigma is not None:
        d_y = d_y + t_sigma * by_sigma
    return d_y


def _exchange_vjp_terms(cfg: _Config, theta, sigma, perturbed, y, v) -> Array:
    """(B, M, D) per-sample terms of the conditional estimate of Q J^T Q v (see
    `_conditional_tangent`): sum_k w_mik (v_i - v_p), v projected before, the terms
    after."""
    project = lambda x: _invariant_free(cfg, x, theta.shape[1:])
    v = project(v)

    def terms(perturbed, y, keep):
        w, _, partners = _exchange_weights(cfg, theta, sigma, perturbed, y, keep)
        if partners is None:
            other = v[:, None, None, :]
        else:
            slots, pivots = partners
            other = _at_slots(jax.vmap(lambda p, x: x[p])(pivots, v), slots)  # v at partners
        return jnp.sum(w * (v[:, None, :, None] - other), axis=-1)

    if _dense_exchanges(cfg.solver, theta.shape[1:], theta.dtype):
        return project(_sample_blocks(terms, perturbed, y, None, per_sample=True))
    return project(terms(perturbed, y, None))


@eqx.filter_custom_jvp
def _kernel(theta, sigma, key, *, cfg: _Config):
    """(y_eps (B, *out), F_eps (B,)) from one solver pass; theta is (B, *event)."""
    _, perturbed, y, _ = _forward(cfg, theta, sigma, key, written=True)
    return _reduce(theta.shape, perturbed, y)


@_kernel.def_jvp
def _kernel_jvp(primals, tangents, *, cfg: _Config):
    """Derivatives of (y_eps, F_eps) from the samples of the same solver pass.

    - F_eps: pathwise (envelope theorem), d<theta~, y*(theta~)> = <y*, d theta~>.
    - y_eps: score-function estimator (Berthet et al. 2020, Prop. 3.1 and its
      analogues for sigma and for the multiplicative perturbation) with a control
      variate, symmetrised when the Jacobian is symmetric (see `_jacobian_terms`).
    """
    theta, sigma, key = primals
    t_theta, t_sigma, _ = tangents
    # With conditional Monte Carlo, the solver's `exchanges` read the perturbed inputs
    # too: write them out once (`_solver_input`). A Fenchel-Young step of the simplex
    # (batch 4, M = 2000, d = 500) took 21 against 55 ms; with the score function the
    # boundary made one-instance steps slower in our A/B, so it is not used there.
    z, perturbed, y, y_plain = _forward(cfg, theta, sigma, key, written=cfg.conditional)
    y_eps, f_eps = _reduce(theta.shape, perturbed, y)
    b, m = y.shape[:2]
    d = math.prod(theta.shape[1:])
    same_shape = y.shape[2:] == theta.shape[1:]
    d_f = jnp.zeros((b,), theta.dtype)
    if same_shape:
        g_theta, g_sigma = _max_grad_sums(cfg, sigma, z, perturbed, y)
        if cfg.conditional:
            g_theta = g_theta + _conditional_shift(cfg, theta, sigma, perturbed, y, None)
        d_f = _max_tangent(g_theta / m, g_sigma / m, t_theta, t_sigma)
    if cfg.conditional:
        sums_of = lambda u, want: _exchange_sums(cfg, theta, sigma, perturbed, y, None, u, want)
        t = None if t_theta is None else t_theta.reshape(b, d)
        d_y = _conditional_tangent(cfg, sums_of, t, t_sigma, theta.shape[1:]) / m
        return (y_eps, f_eps), (d_y.reshape(y_eps.shape), d_f)
    multiplicative = cfg.perturbation == "multiplicative"
    terms = _jacobian_terms(cfg, theta, z, y, y_plain)
    c, gn, gs = terms.centred, terms.grad_nu, terms.scores
    t = u = None
    if t_theta is not None:
        t = t_theta.reshape(b, d)
        u = t / theta.reshape(b, d) if multiplicative else t
    sums_of = lambda u, rp_u: _jacobian_sums(
        cfg, sigma, z, c, gn, gs, u, t, t_sigma, terms.alpha is not None, terms.moment, rp_u,
        terms.gram,
    )
    apply_p = None if terms.moment is None else (lambda v: _apply_p(gs, v))
    d_y = _jacobian_tangent(cfg, m, sums_of, terms.alpha, u, theta.shape[1:], apply_p)
    d_y = d_y / (m * sigma)
    return (y_eps, f_eps), (d_y.reshape(y_eps.shape), d_f)


def _streams(cfg: _Config, key: PRNGKeyArray, batch: int, size: int) -> bool:
    """Whether the layer and `max` run in chunks of samples with `chunk_size` (see
    `_streamed_sums`): the built-in elementwise noises with a partitionable Threefry
    key, one device, independent or stratified draws (not `orthogonal`)."""
    m = _independent(cfg, cfg.num_samples)
    return (
        cfg.chunk_size is not None
        and cfg.chunk_size < batch * cfg.num_samples
        and cfg.mesh is None
        and not cfg.orthogonal
        and type(cfg.noise) in (Gumbel, Normal)
        and _one_draw(cfg.noise, key)
        and 2 * batch * (2 * m) * size < 2**32
    )


def _chunking(cfg: _Config, batch: int) -> tuple[int, int, int]:
    """(pairs, c, num_chunks): chunk j holds samples j*c .. j*c+c-1 of each instance
    (and their antithetic partners: pairs = 2), about `chunk_size` solves in all."""
    pairs = 2 if cfg.antithetic else 1
    m = _independent(cfg, cfg.num_samples)
    assert cfg.chunk_size is not None
    c = max(1, min(m, cfg.chunk_size // (batch * pairs)))
    return pairs, c, -(-m // c)


def _chunk_noise(cfg: _Config, theta: Array, key: PRNGKeyArray, j: Array, c: int):
    """Chunk j's slice of the noise of the whole draw (B, pairs*c, *event), and the
    mask (1, pairs*c, 1...) that zeroes the padding of a last, partial chunk."""
    b, event = theta.shape[0], theta.shape[1:]
    z = _draw_noise(cfg, key, b, event, theta.dtype, window=((j * c).astype(jnp.uint32), c))
    return z, _chunk_keep(cfg, j, c, theta.dtype).reshape(1, -1, *([1] * len(event)))


def _chunk_keep(cfg: _Config, j: Array, c: int, dtype) -> Array:
    """1 for chunk j's samples, 0 for its padding (pairs*c,)."""
    keep = j * c + jnp.arange(c) < _independent(cfg, cfg.num_samples)
    return jnp.tile(keep.astype(dtype), 2 if cfg.antithetic else 1)


def _streamed_sums(
    cfg: _Config, theta: Array, sigma: Array, key: PRNGKeyArray, keep_y=False, written=False
):
    """Means over the samples of <theta~_m, y_m> (B,), of its derivatives in theta
    (B, D) and in sigma (B,), and of y_m (B, *event), from a scan over chunks: each
    step draws its slice of the same noise as the whole draw (`window_key`), solves
    it and adds to running sums, so memory holds one chunk of about `chunk_size`
    perturbed instances. The last chunk is padded with samples that are solved and
    then masked out. With `keep_y`, also the solutions, chunk by chunk
    (num_chunks, B, pairs*c, *event), padding zeroed; `written` as in `_forward`."""
    b, event = theta.shape[0], theta.shape[1:]
    _, c, num_chunks = _chunking(cfg, b)

    def step(sums, j):
        z, keep = _chunk_noise(cfg, theta, key, j, c)
        perturbed = _perturb(cfg, theta, sigma, z)
        if written:
            perturbed = _solver_input(perturbed, key)
        y = solve_batch(cfg.solver, perturbed.reshape(-1, *event)).astype(theta.dtype)
        y = y.reshape(b, -1, *event) * keep
        f = jnp.einsum("bmd,bmd->b", _flat(perturbed), _flat(y))
        g_theta, g_sigma = _max_grad_sums(cfg, sigma, z, perturbed, y)
        if cfg.conditional:
            keep_c = _chunk_keep(cfg, j, c, theta.dtype)
            g_theta = g_theta + _conditional_shift(cfg, theta, sigma, perturbed, y, keep_c)
        new = (f, g_theta, g_sigma, jnp.sum(y, axis=1))
        return jax.tree.map(jnp.add, sums, new), (y if keep_y else None)

    per_instance = jnp.zeros((b,), theta.dtype)
    init = (per_instance, jnp.zeros((b, math.prod(event)), theta.dtype), per_instance,
            jnp.zeros_like(theta))
    sums, ys = jax.lax.scan(step, init, jnp.arange(num_chunks))
    return jax.tree.map(lambda x: x / cfg.num_samples, sums), ys


@eqx.filter_custom_jvp
def _streamed_max(theta, sigma, key, *, cfg: _Config):
    """F_eps (B,) by `_streamed_sums`; theta is (B, *event)."""
    return _streamed_sums(cfg, theta, sigma, key, written=True)[0][0]


@_streamed_max.def_jvp
def _streamed_max_jvp(primals, tangents, *, cfg: _Config):
    """Pathwise, as in `_kernel_jvp`: the derivatives are running sums too."""
    theta, sigma, key = primals
    (f_eps, g_theta, g_sigma, _), _ = _streamed_sums(cfg, theta, sigma, key)
    return f_eps, _max_tangent(g_theta, g_sigma, *tangents[:2])


def _max_tangent(g_theta: Array, g_sigma: Array, t_theta, t_sigma) -> Array:
    """d F_eps from its mean derivatives (B, D) and (B,); None tangents are zero."""
    d_f = jnp.zeros_like(g_sigma)
    if t_theta is not None:
        d_f = d_f + jnp.einsum("bd,bd->b", g_theta, t_theta.reshape(g_theta.shape))
    if t_sigma is not None:
        d_f = d_f + t_sigma * g_sigma
    return d_f


@eqx.filter_custom_jvp
def _streamed_kernel(theta, sigma, key, *, cfg: _Config):
    """(y_eps (B, *event), F_eps (B,)) as `_kernel`, by `_streamed_sums`."""
    (f_eps, _, _, y_eps), _ = _streamed_sums(cfg, theta, sigma, key, written=True)
    return y_eps, f_eps


@_streamed_kernel.def_jvp
def _streamed_kernel_jvp(primals, tangents, *, cfg: _Config):
    """The estimators of `_kernel_jvp`, written as sums over the chunks.

    The solutions are kept (one array of all samples: the Jacobian estimator's
    residual under reverse mode); the noise and its scores are drawn again chunk by
    chunk in the tangent pass (`jax.checkpoint`: also in the backward pass), so
    nothing else of size M is held, and the solver still runs once per sample. What
    needs all samples first (the symmetrisation weights, the scores' moments of the
    regression and covariance control variates) takes its own pass over the chunks.
    """
    theta, sigma, key = primals
    t_theta, t_sigma, _ = tangents
    (f_eps, g_theta, g_sigma, y_eps), ys = _streamed_sums(cfg, theta, sigma, key, keep_y=True)
    assert ys is not None
    d_f = _max_tangent(g_theta, g_sigma, t_theta, t_sigma)
    b, event = theta.shape[0], theta.shape[1:]
    d, m = math.prod(event), cfg.num_samples
    pairs, c, num_chunks = _chunking(cfg, b)
    multiplicative = cfg.perturbation == "multiplicative"
    ys = ys.reshape(num_chunks, b, pairs * c, d)
    chunks = jnp.arange(num_chunks)
    if cfg.conditional:
        def exchange_sums(u, want_sigma):
            @jax.checkpoint
            def step(acc, x):
                j, y = x
                z, _ = _chunk_noise(cfg, theta, key, j, c)
                new = _exchange_sums(
                    cfg, theta, sigma, _perturb(cfg, theta, sigma, z),
                    y.reshape(b, -1, *event), _chunk_keep(cfg, j, c, theta.dtype), u,
                    want_sigma,
                )
                return jax.tree.map(jnp.add, acc, new), None

            zeros = jnp.zeros((b, d), theta.dtype)
            return jax.lax.scan(step, (zeros, zeros), (chunks, ys))[0]

        t = None if t_theta is None else t_theta.reshape(b, d)
        d_y = _conditional_tangent(cfg, exchange_sums, t, t_sigma, event) / m
        return (y_eps, f_eps), (d_y.reshape(y_eps.shape), d_f)
    y_sum = y_eps.reshape(b, d) * m
    y_plain = None
    if cfg.control_variate == "unperturbed" and not cfg.antithetic:
        y_plain = solve_batch(cfg.solver, theta).astype(theta.dtype)
    centre = _centring(cfg, m, y_sum, y_plain)

    def noise_sums(f):
        """sum over the chunks of f(scores (B, pairs*c, D), padding zeroed): a pass
        that only draws the noise (recomputed, not stored, under reverse mode)."""
        @jax.checkpoint
        def step(acc, j):
            z, keep = _chunk_noise(cfg, theta, key, j, c)
            gn = _flat(cfg.noise.grad_nu(z)) * keep.reshape(1, -1, 1)
            return jax.tree.map(jnp.add, acc, f(gn)), None

        shapes = jax.eval_shape(f, jax.ShapeDtypeStruct((b, pairs * c, d), theta.dtype))
        init = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
        return jax.lax.scan(step, init, chunks)[0]

    alpha = None
    if _symmetrised(cfg):
        def dev2(acc, x):  # a scan, so that no backend forms a second array of all y
            j, y = x
            keep = _chunk_keep(cfg, j, c, theta.dtype)[None, :, None]
            return acc + jnp.sum(keep * (y - y_sum[:, None] / m) ** 2, axis=1), None

        s2, _ = jax.lax.scan(dev2, jnp.zeros((b, d), theta.dtype), (chunks, ys))
        alpha = _symmetry_weights(s2 / m)
    whiten = None
    if cfg.control_variate == "regression" and m > 1:
        # the scores' sample covariance
        g_sum, gg_sum = noise_sums(
            lambda gn: (jnp.sum(gn, axis=1), jnp.einsum("bmi,bmj->bij", gn, gn))
        )
        g_mean = g_sum / m
        cov = gg_sum / m - g_mean[:, :, None] * g_mean[:, None, :]
        whiten = _whitening_of(cov, _independent(cfg, m))
    covariance = _covariance_applies(cfg, m, d)

    def p_of(v):  # P v, summed over the chunks
        return noise_sums(lambda gn: _outer_sum(gn, v)) / m - v

    apply_p = p_of if covariance else None

    t = u = None
    if t_theta is not None:
        t = t_theta.reshape(b, d)
        u = t / theta.reshape(b, d) if multiplicative else t

    def sums_of(u, rp_u):
        @jax.checkpoint
        def step(acc, x):
            j, y = x
            z, keep = _chunk_noise(cfg, theta, key, j, c)
            cm = centre(y) * keep.reshape(1, -1, 1)
            gn = _flat(cfg.noise.grad_nu(z))
            gs = gn if whiten is None else jnp.einsum("bij,bmj->bmi", whiten, gn)
            moment = _moment(cfg, gs, m, event) if covariance else None
            new = _jacobian_sums(
                cfg, sigma, z, cm, gn, gs, u, t, t_sigma, alpha is not None, moment, rp_u
            )
            return jax.tree.map(jnp.add, acc, new), None

        zeros = jnp.zeros((b, d), theta.dtype)
        w0 = zeros if covariance and t is not None and alpha is not None else None
        return jax.lax.scan(step, (zeros, zeros, zeros, w0), (chunks, ys))[0]

    d_y = _jacobian_tangent(cfg, m, sums_of, alpha, u, event, apply_p) / (m * sigma)
    return (y_eps, f_eps), (d_y.reshape(y_eps.shape), d_f)


# Compiled once per shape and configuration, so that eager calls do not dispatch the
# kernel op by op; inside a user's `jit` it is inlined.
_jit_kernel = eqx.filter_jit(_kernel)
_jit_streamed_max = eqx.filter_jit(_streamed_max)
_jit_streamed_kernel = eqx.filter_jit(_streamed_kernel)


def _stderr(x: Array, cfg: _Config, d: int) -> Array:
    """Standard error of the mean over axis 1 of x (B, M, ...), from its independent
    units: the samples, the antithetic pairs, or with `orthogonal` the blocks of
    min(units, d) (see `orthogonal_normal`). For blocks: the spread of the full
    blocks' sums around their expected value (divided by the mean factor c4 of a
    standard deviation from few blocks, so few blocks give a noisy error, not a biased
    one), and for the units of a last, partial block the independent-sample variance
    (its strata are a random subset). With fewer than two full blocks, the units are
    taken as independent (orthogonal samples usually make that an overstatement)."""
    units = _pairs(x) if cfg.antithetic else x
    n = units.shape[1]
    if n < 2:
        return jnp.full(x.shape[:1] + x.shape[2:], jnp.nan, x.dtype)
    plain = jnp.var(units, axis=1, ddof=1)
    block = min(n, d) if cfg.orthogonal else 1
    full, rest = divmod(n, block)
    if block == 1 or full < 2:
        return jnp.sqrt(plain / n)
    sums = jnp.sum(units[:, : full * block].reshape(x.shape[0], full, block,
                                                  *units.shape[2:]), axis=2)
    dev = sums - block * jnp.mean(units, axis=1, keepdims=True)
    c4 = math.sqrt(2 / (full - 1)) * math.exp(math.lgamma(full / 2) - math.lgamma((full - 1) / 2))
    var_full = jnp.sum(dev**2, axis=1) / (full - 1) / c4**2  # of one block's sum
    return jnp.sqrt(full * var_full + rest * plain) / n


def _score_vjp_stats(cfg: _Config, theta, sigma, z, y, y_plain, v, m: int, d: int):
    """J^T v (B, D) of the score-function estimator, as jax.grad computes it, and its
    standard error (B, D), from the samples of `_stats`."""
    vjp_of = lambda z, y: _vjp_estimate(cfg, theta, sigma, z, y, y_plain, v)
    vjp, per, terms = vjp_of(z, y)
    n_eff = _independent(cfg, m)
    # The covariance correction is a product of sample means, whose error the
    # spread of `per` misses (up to 3 times too small); a regression on about as
    # many samples as coefficients leaves too few residual degrees of freedom for
    # the formula below (2.6 to 5 times too large at d = 97, M = 100 and d = 100,
    # M = 20). Both take a jackknife, which counts what is missed (and, as
    # jackknives do, overstates the error a little: 1.0 to 1.37 times in our checks).
    regression_few = cfg.control_variate == "regression" and n_eff < 1.15 * (d + 1)
    units = n_eff // _block(cfg, d)
    if units >= 3 and (terms.moment is not None or (regression_few and not cfg.orthogonal)):
        vjp_err = _jackknife_stderr(cfg, m, d, lambda idx: vjp_of(z[:, idx], y[:, idx])[0])
    else:
        if cfg.control_variate == "regression":
            # A regression's error is that of its residuals (the spread of `per`
            # would ignore what the fit removes): the same terms with every
            # solution replaced by its residual from the least-squares prediction.
            gn, gs, c = terms.grad_nu, terms.scores, terms.centred
            coef = jnp.einsum("bmo,bmd->bod", c, gs) / m
            resid = c - jnp.einsum("bod,bmd->bmo", coef, gn) / _score_scale(gn)
            per = _vjp_terms(cfg, theta, sigma, resid, gs, *_split_cotangent(v, terms))
            # residuals of a fit of d + 1 coefficients: the usual degrees of freedom
            per = per * math.sqrt(n_eff / max(n_eff - d - 1, 1))
        vjp_err = _stderr(per, cfg, d)
    return vjp, vjp_err


@eqx.filter_jit
def _stats(theta, sigma, key, cotangent, *, cfg: _Config):
    """MonteCarloStats (flattened batch) from the samples `_kernel` would use."""
    z, perturbed, y, y_plain = _forward(cfg, theta, sigma, key)
    y_eps, f_eps = _reduce(theta.shape, perturbed, y)
    b, m = y.shape[:2]
    d = math.prod(theta.shape[1:])
    yf = _flat(y)
    if y.shape[2:] == theta.shape[1:]:
        f_err = _stderr(jnp.einsum("bmd,bmd->bm", _flat(perturbed), yf), cfg, d)
    else:
        f_err = jnp.zeros_like(f_eps)
    vjp = vjp_err = None
    if cotangent is not None:
        # Per-sample terms of the transposed (reverse-mode) estimator; their mean is
        # exactly what jax.grad returns for <cotangent, y_eps>.
        v = cotangent.reshape(b, -1).astype(theta.dtype)
        if cfg.conditional:
            per = _exchange_vjp_terms(cfg, theta, sigma, perturbed, y, v)
            vjp, vjp_err = jnp.mean(per, axis=1), _stderr(per, cfg, d)
        else:
            vjp, vjp_err = _score_vjp_stats(cfg, theta, sigma, z, y, y_plain, v, m, d)
        vjp, vjp_err = vjp.reshape(theta.shape), vjp_err.reshape(theta.shape)
    return MonteCarloStats(
        y_eps=y_eps,
        y_eps_stderr=_stderr(yf, cfg, d).reshape(y_eps.shape),
        max=f_eps,
        max_stderr=f_err,
        vjp=vjp,
        vjp_stderr=vjp_err,
    )


def _split_cotangent(v: Array, terms: _Terms):
    """(alpha v, (1 - alpha) v) for the plain and transposed estimators (None)."""
    if terms.alpha is None:
        return v, None
    return v * terms.alpha, v * (1 - terms.alpha)


def _vjp_estimate(cfg: _Config, theta, sigma, z, y, y_plain, v):
    """J^T v (B, D) from the samples z, y (B, k, ...), as jax.grad computes it; also
    its per-sample terms (B, k, D) and the estimator's terms, with the scores
    projected (`_invariant_free`, which the kernels apply through the tangents)."""
    terms = _jacobian_terms(cfg, theta, z, y, y_plain)
    terms = terms._replace(scores=_invariant_free(cfg, terms.scores, theta.shape[1:]))
    if terms.alpha is not None:  # the projected symmetrised estimate P J (transposed)
        v = _invariant_free(cfg, v, theta.shape[1:])
    gs = terms.scores
    if terms.moment is not None:
        gs = _covariance_scores(cfg, gs, terms.moment, terms.gram)
    per = _vjp_terms(cfg, theta, sigma, terms.centred, gs, *_split_cotangent(v, terms))
    return jnp.mean(per, axis=1), per, terms


def _jackknife_stderr(
    cfg: _Config, m: int, d: int, estimate: Callable[[Array], Array]
) -> Array:
    """Delete-a-group jackknife standard error of `estimate(indices)` (B, D), an
    estimate from the samples at `indices`: K = min(20, n) groups of g = n // K of the
    n independent units (samples, antithetic pairs, or with `orthogonal` whole blocks
    of `_block` draws, with their partners; removed together); the other units (and a
    last, partial block) stay in every subsample. For a mean this gives its usual
    standard error; for products of means (control variates fitted on the same
    samples) it also counts what the first-order spread misses."""
    draws = _independent(cfg, m)
    block = _block(cfg, d)
    n = draws // block
    k = min(20, n)
    g = n // k
    units = [
        [u for u in range(draws) if not i * g * block <= u < (i + 1) * g * block]
        for i in range(k)
    ]
    if cfg.antithetic:  # a unit is a pair: sample u and its partner u + draws
        units = [u + [x + draws for x in u] for u in units]
    ests = jax.vmap(estimate)(jnp.asarray(units))  # (K, B, D)
    dev2 = jnp.sum((ests - jnp.mean(ests, axis=0, keepdims=True)) ** 2, axis=0) * k / (k - 1)
    n_units = draws / block  # a partial block counted by its share
    return jnp.sqrt(dev2 * (n_units - g) ** 2 / (k * g * n_units))


def _vjp_terms(cfg: _Config, theta, sigma, c, gs, va, vt) -> Array:
    """(B, M, D) per-sample terms of J^T v, with va = alpha v and vt = (1 - alpha) v."""
    per = gs * jnp.einsum("bmo,bo->bm", c, va)[..., None]
    if cfg.perturbation == "multiplicative":
        per = per / theta.reshape(theta.shape[0], 1, -1)
    if vt is not None:
        per = per + c * jnp.einsum("bmd,bd->bm", gs, vt)[..., None]
    return per / sigma


class MonteCarloStats(eqx.Module):
    """Monte-Carlo estimates and their standard errors, from one set of samples.

    Returned by [`structpert.PerturbedOptimizer.stats`][]. The standard error of a
    mean of $M$ samples is $\\hat s/\\sqrt{M}$, with $\\hat s$ the sample standard
    deviation (with antithetic sampling, over the $M/2$ pair means; with
    `orthogonal=True`, from the spread of the sums of the independent blocks, see the
    guide "Gradient estimators"). It falls as $1/\\sqrt{M}$: to reach a target
    standard error $\\tau$, use about $M (\\mathrm{stderr}/\\tau)^2$ samples.

    **Fields:**

    - `y_eps`: $y_\\varepsilon(\\theta)$, `(*batch, *event)`: exactly what the layer
      returns for the same key.
    - `y_eps_stderr`: its standard error per coordinate. With the score function it
      is also the standard error of the Fenchel-Young loss gradient
      $y_\\varepsilon(\\theta) - y$; with conditional Monte Carlo that gradient is
      the conditional estimate of $y_\\varepsilon$, whose error is lower (this bounds
      it).
    - `max`: $F_\\varepsilon(\\theta)$, `(*batch)`.
    - `max_stderr`: its standard error (also that of the Fenchel-Young loss value).
    - `vjp`: with a `cotangent` $v$, the estimated gradient
      $\\nabla_\\theta \\langle v, y_\\varepsilon(\\theta)\\rangle = J^\\top v$, exactly
      what `jax.grad` returns for the same key; `None` otherwise.
    - `vjp_stderr`: its standard error per coordinate; `None` without a
      `cotangent`. With `control_variate="covariance"` (the default for `Normal`
      noise) it is a delete-a-group jackknife over 20 groups of samples (the whole
      estimate, weights included, recomputed without each group), which errs on the
      safe side: 1.06 to 1.37 times the spread over keys in our checks; so is it
      with `"regression"` and fewer than $1.15(d+1)$ independent draws. Otherwise
      it treats the control variate and the symmetrisation weights as fixed (with
      `"regression"`, from the residuals of the least-squares fit).
    """

    y_eps: Array
    y_eps_stderr: Array
    max: Array
    max_stderr: Array
    vjp: Array | None = None
    vjp_stderr: Array | None = None


def _check_theta(theta, event_ndim: int | None, who: str) -> int:
    """Validate theta at trace time; returns the number of event axes."""
    if not isinstance(theta, jax.Array | jnp.ndarray) and not hasattr(theta, "dtype"):
        raise TypeError(f"{who}: `theta` must be a JAX array, got {type(theta).__name__}.")
    if not jnp.issubdtype(theta.dtype, jnp.floating):
        raise TypeError(
            f"{who}: `theta` must have a floating dtype, got {theta.dtype}. "
            "Cast it first, e.g. `theta.astype(jnp.float32)`."
        )
    ndim = theta.ndim if event_ndim is None else event_ndim
    if theta.ndim < ndim:
        raise ValueError(
            f"{who}: `theta` has shape {theta.shape} but the solver needs at least "
            f"{ndim} axes (one instance has {ndim} axes; leading axes are batch axes)."
        )
    return ndim


class PerturbedOptimizer(eqx.Module):
    """A differentiable layer: the perturbed argmax $y_\\varepsilon(\\theta) =
    \\mathbb{E}[y^*(\\theta + \\varepsilon Z)]$ of any solver.

    Calling it returns $y_\\varepsilon(\\theta)$; [`structpert.PerturbedOptimizer.max`][]
    returns the perturbed max $F_\\varepsilon(\\theta) = \\mathbb{E}[\\max_y \\langle y,
    \\theta + \\varepsilon Z\\rangle]$, whose gradient is $y_\\varepsilon(\\theta)$. Both
    are Monte-Carlo estimates over `num_samples` noise draws, and both have custom
    JVPs: value and derivative come from **one** solver pass over the perturbed
    inputs, so `jax.grad`, `jax.jvp`, `jax.jacrev`, `jax.vmap` and `jax.jit` all work.

    For solvers that list their exchanges (the built-in `Simplex`, `TopK` and
    `Permutahedron`), the Jacobian of $y_\\varepsilon$ is estimated by conditional
    Monte Carlo: each sample's solution averaged in closed form over each entry's own
    noise (`jacobian`). Otherwise it is estimated by
    $\\hat J = \\frac{1}{M\\varepsilon}\\sum_m (y_m - b_m) \\nabla\\nu(Z_m)^\\top$ with a
    baseline $b_m$ (`control_variate`); as the true Jacobian is symmetric (it is the
    Hessian of $F_\\varepsilon$), it is combined with $\\hat J^\\top$, row $i$ weighted
    by $\\alpha_i = S/(S + d\\,s_i^2)$ ($s_i^2$ the sample variance of $y_i$, $S =
    \\sum_j s_j^2$; `symmetric_jacobian`). For a solver that declares
    `shift_invariant_axes` (the built-in simplex, top-k, ranking and assignment), the
    estimate and the noise scores are projected off those directions: unbiased, lower
    variance, no extra cost. The gradient of
    $F_\\varepsilon$ is the pathwise mean of the solutions, or with conditional Monte
    Carlo, their mean given the other entries' noise, entry by entry (lower variance;
    the layer's value stays the mean of the solutions).
    [`structpert.PerturbedOptimizer.stats`][] gives the standard errors of all these
    estimates. The guide "Gradient estimators" compares the options with numbers.

    **Arguments:**

    - `solver`: an [`structpert.AbstractSolver`][].
    - `noise`: an [`structpert.AbstractNoise`][]; default [`structpert.Gumbel`][].
    - `sigma`: the noise scale $\\varepsilon > 0$, a float or a scalar array (it can be
      traced, and it gets a gradient too).
    - `num_samples`: the number $M \\ge 1$ of noise draws per instance.
    - `perturbation`: `"additive"` ($\\theta + \\varepsilon Z$, default) or
      `"multiplicative"` ($\\theta \\odot e^{\\varepsilon Z - \\varepsilon^2/2}$, which
      keeps the sign of every entry, e.g. costs stay costs; its Jacobian divides by
      $\\theta$, so entries must be nonzero).
    - `control_variate`: the baseline of the Jacobian estimator. `"auto"` (default):
      `"covariance"` with `Normal` noise, `"leave_one_out"` otherwise.
      `"leave_one_out"`: the mean of the other $M-1$ samples (free).
      `"unperturbed"`: $y^*(\\theta)$, one more solve per instance, in the same
      solver pass. `"none"`. `"regression"`: leave-one-out plus the least-squares fit
      of the solutions on the noise scores (the sample covariance of the scores as a
      second control variate; no extra solve, $O(Md^2)$ arithmetic per instance, $d
      \\le 4096$). `"covariance"`: leave-one-out plus the difference between the
      scores' sample second moment and its known value $I$, weighted leave-one-out so
      that it adds no bias, and by $n/(n+d)$ for $n$ independent draws ($O(Md)$
      arithmetic, no extra solve; `Gumbel` and `Normal` noise; with `orthogonal`,
      leave-one-block-out).
      They change only the variance of derivatives, never the values. `"regression"`
      is consistent but biased by $O(d/M)$; with `Normal` noise its mean squared
      error was 1.5 to 13 times lower than leave-one-out's. `"covariance"` is
      unbiased; with `Normal` noise its mean squared error was 0.39 to 0.99 times
      leave-one-out's in every case we measured (rankings and top-k, $M$ from $d/5$
      to $33d$), which makes it the default there; with `Gumbel` noise (heavy-tailed
      scores) it was 1.05 to 1.2 times higher on 7 of 9 simplex instances. See the
      guide "Gradient estimators".
    - `antithetic`: draw the noise in pairs $(Z, -Z)$ (symmetric noise only, even
      `num_samples`); the pair then serves as its own control variate. It lowers the
      variance of the values ($y_\\varepsilon$, $F_\\varepsilon$, the Fenchel-Young
      gradient) but usually raises that of the Jacobian (default `False`).
    - `chunk_size`: solve the `batch x num_samples` perturbed instances at most this
      many at a time (bounds the solver's working memory; same result for the same key).
      With a `mesh`, the chunks are taken on each device. Without one, the layer,
      `max` and the Fenchel-Young loss also draw, solve and sum the samples chunk by
      chunk (with `Gumbel` or `Normal` noise, a `jax.random.key` and independent or
      stratified draws; the same noise as unchunked, equal results up to rounding; a last
      partial chunk is solved in full). Values, the Fenchel-Young gradient and
      forward-mode derivatives then hold about `chunk_size` perturbed instances
      instead of all of them; reverse-mode derivatives of the layer also keep the
      solutions of all samples (one array), still with one solver call per sample.
    - `mesh`: a `jax.sharding.Mesh`, or None (default). If given, the `batch x
      num_samples` solver calls are spread over its devices with `jax.shard_map`
      (padded to a multiple of the device count); the result does not depend on the
      number of devices. See the multi-device guide.
    - `mesh_axes`: the mesh axis name, or tuple of names, to spread the solver calls
      over; default: all axes of `mesh`.
    - `symmetric_jacobian`: use the symmetry of the Jacobian (default `True`). Valid
      when the solver returns an exact maximiser of $\\langle y, \\theta\\rangle$;
      set `False` for a heuristic or approximate solver, whose smoothed output need
      not have a symmetric Jacobian. Ignored with `perturbation="multiplicative"`.
      The weights come from the same samples, which leaves a bias of order $1/M$,
      far below the Monte-Carlo error (not detected in our tests).
    - `orthogonal`: draw the samples of each instance in blocks of $\\min(M, d)$
      mutually orthogonal vectors (stratified lengths for $d \\le 64$), each exactly
      $N(0, I)$ (`noise=sp.Normal()` only; with `antithetic`, the $M/2$ first
      samples). Unbiased like independent draws (the linear part of the solutions'
      response to the noise then averages out, up to the spread of the lengths).
      `"auto"` then takes the covariance control variate leave-one-block-out. In our
      benchmark the Jacobian estimate's mean squared error was about 6 times lower
      than with independent draws on rankings of 100 items, 1.5 to 1.6 times on
      top-10, 1.03 to 1.2 times on 5 x 5 assignments and the same on 6-item
      rankings; with `antithetic` too, it was the lowest of the unbiased options on
      all of them. Cost: $O(Md\\min(M, d))$ arithmetic per instance to
      orthogonalise, about 4 ms on a CPU and 0.5 ms on a GPU at $d = 100$, $M =
      1000$ (default `False`).
    - `stratified`: draw the samples of each instance as a Latin hypercube: in every
      coordinate the $M$ (or $M/2$ antithetic) values fall one in each of $M$
      equally likely strata, and each sample is still exactly the noise, so values
      stay unbiased. It removes the part of the error that is additive in the noise's
      coordinates. At $M = 200$ in our benchmark, the mean squared error of the
      Fenchel-Young gradient ($y_\\varepsilon - y$) was 0.35 to 0.80 times that of
      independent draws on the simplex (Gumbel noise), 0.33 to 0.44 on 6-item and
      0.022 to 0.026 on 100-item rankings, 0.23 to 0.24 on top-10 and 0.56 to 0.59
      on 5 x 5 assignments (Normal noise), below antithetic pairs' everywhere; that of the
      gradient of a loss on $y_\\varepsilon$ was 0.43 to 1.0 times the default's.
      The control variates still treat the draws as independent, which leaves a bias
      of order $1/M$ in the derivatives of a loss on $y_\\varepsilon$ (on a 6-item
      ranking, 1.9% of the gradient's norm at $M = 200$ against 1.1% with
      independent draws, whose root mean squared error was 15%). `stats` treats
      the samples as independent too, which overstates the error of values.
      Needs a noise with a `quantile` method ([`structpert.Gumbel`][],
      [`structpert.Normal`][]); not with `orthogonal`. Works with `chunk_size`
      (drawn chunk by chunk). Cost: a keyed shuffle of the strata per entry, about
      as much again as drawing the noise (0.4 to 0.5 ms on a 2-core CPU at $d =
      100$, $M = 1000$): worth it with any solver that costs more than drawing the
      noise, or when solver calls are what is counted; on the argmax of a vector,
      a step took 1.25 to 2.7 times as long (default `False`).

    - `jacobian`: how the Jacobian of $y_\\varepsilon$ (any loss on it) is estimated.
      `"score"`: the score-function estimator above, for any solver. `"conditional"`:
      conditional Monte Carlo, for a solver that lists its exchanges
      (`AbstractSolver`, **Optional: `exchanges`**: the built-in `Simplex`, `TopK`
      and `Permutahedron`) and a noise with a `density` and a `cdf` (`Gumbel`,
      `Normal`), additive perturbation; it also gives the gradient of
      $F_\\varepsilon$ (the Fenchel-Young gradient), each entry's mean given the
      other entries' noise. For each sample and each entry $i$, it averages the
      solution over $i$'s own noise in closed form, with the other entries' noise as
      drawn, and differentiates that exactly: unbiased, with any sampling option,
      and no extra solve. At $M = 200$ in our benchmark, the gradient of a loss on
      $y_\\varepsilon$ had 1.9 to 170 times lower mean squared error than with the
      score function (simplex, top-10, rankings of 6 and 100 items). `"auto"`
      (default): `"conditional"` where it applies and `control_variate` is left at
      `"auto"` (the control variates belong to the score function); `"score"`
      otherwise, and for rankings of more than 100 items. Cost: $O(MdK)$
      arithmetic per instance for $K$ exchange levels per entry: one for the argmax
      and top-k, $d$ for a ranking (hence the limit of `"auto"`: at $d = 100$, $M =
      1000$, a step on a 2-core CPU took 1.8 times (loss on $y_\\varepsilon$) and 2.5
      times (Fenchel-Young) as long as with the score function, 2.4 and 3.3 times at
      $d = 200$).

    **Keys:** one key for the whole batch; the noise of instance $i$ (in row-major
    order over the batch axes) depends only on the key and $i$, so results do not
    depend on the batch size, on chunking or on the number of devices. With the
    built-in noises and JAX's default Threefry keys, the `(batch, num_samples,
    *event)` noise is one draw whose entries depend only on the key and their index;
    otherwise instance $i$ draws from `jax.random.fold_in(key, i)`.

    !!! Example

        ```python
        import jax, jax.numpy as jnp
        import structpert as sp

        opt = sp.PerturbedOptimizer(sp.Simplex(), noise=sp.Gumbel(), sigma=0.5,
                                    num_samples=1000)
        theta = jnp.array([-0.6, 1.9, -0.2, 1.1, -1.0])
        y = opt(theta, key=jax.random.key(0))   # close to softmax(theta / 0.5)
        ```
    """

    solver: AbstractSolver
    noise: AbstractNoise = Gumbel()
    sigma: int | float | Array = 1.0
    num_samples: int = eqx.field(default=100, static=True)
    perturbation: Perturbation = eqx.field(default="additive", static=True)
    control_variate: ControlVariate = eqx.field(default="auto", static=True)
    antithetic: bool = eqx.field(default=False, static=True)
    chunk_size: int | None = eqx.field(default=None, static=True)
    mesh: jax.sharding.Mesh | None = eqx.field(default=None, static=True)
    mesh_axes: str | tuple[str, ...] | None = eqx.field(default=None, static=True)
    symmetric_jacobian: bool = eqx.field(default=True, static=True)
    orthogonal: bool = eqx.field(default=False, static=True)
    stratified: bool = eqx.field(default=False, static=True)
    jacobian: Jacobian = eqx.field(default="auto", static=True)

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver):
            raise TypeError(
                "PerturbedOptimizer: `solver` must be a structpert.AbstractSolver, got "
                f"{type(self.solver).__name__}. Wrap a plain function with "
                "structpert.FunctionSolver(fn)."
            )
        if not isinstance(self.noise, AbstractNoise):
            raise TypeError(
                "PerturbedOptimizer: `noise` must be a structpert.AbstractNoise such as "
                f"sp.Gumbel() or sp.Normal(), got {type(self.noise).__name__}."
            )
        if isinstance(self.sigma, int | float) and not self.sigma > 0:
            raise ValueError(
                f"PerturbedOptimizer: `sigma` must be > 0, got {self.sigma}. "
                "Typical values are 0.1 to 1 times the scale of theta."
            )
        m = self.num_samples
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(
                f"PerturbedOptimizer: `num_samples` must be an int >= 1, got {m!r}."
            )
        if self.perturbation not in _PERTURBATIONS:
            raise ValueError(
                f"PerturbedOptimizer: `perturbation` must be one of {_PERTURBATIONS}, "
                f"got {self.perturbation!r}."
            )
        if self.control_variate not in _CONTROL_VARIATES:
            raise ValueError(
                "PerturbedOptimizer: `control_variate` must be one of "
                f"{_CONTROL_VARIATES}, got {self.control_variate!r}."
            )
        if self.antithetic:
            if not type(self.noise).symmetric:
                raise ValueError(
                    "PerturbedOptimizer: `antithetic=True` needs a symmetric noise "
                    f"(such as sp.Normal()); {type(self.noise).__name__} is not."
                )
            if m % 2:
                raise ValueError(
                    "PerturbedOptimizer: `antithetic=True` draws samples in pairs, so "
                    f"`num_samples` must be even, got {m}."
                )
        if self.control_variate == "covariance":
            if type(self.noise) not in (Gumbel, Normal):
                raise ValueError(
                    "PerturbedOptimizer: `control_variate='covariance'` relies on the "
                    "scores of sp.Gumbel() and sp.Normal() having covariance I; got "
                    f"{type(self.noise).__name__}. Use control_variate='leave_one_out'."
                )
        if not isinstance(self.orthogonal, bool):
            raise TypeError(
                "PerturbedOptimizer: `orthogonal` must be True or False, got "
                f"{self.orthogonal!r}."
            )
        if self.orthogonal and not isinstance(self.noise, Normal):
            raise ValueError(
                "PerturbedOptimizer: `orthogonal=True` draws rotated standard normal "
                f"vectors, so it needs `noise=sp.Normal()`, got {type(self.noise).__name__} "
                "(the normal law is the only one with independent coordinates that "
                "rotations leave unchanged). Set orthogonal=False for other noises."
            )
        if not isinstance(self.stratified, bool):
            raise TypeError(
                "PerturbedOptimizer: `stratified` must be True or False, got "
                f"{self.stratified!r}."
            )
        if self.stratified and self.orthogonal:
            raise ValueError(
                "PerturbedOptimizer: `stratified=True` and `orthogonal=True` are two "
                "ways of drawing the samples; set one of them."
            )
        if self.stratified and not has_quantile(self.noise):
            raise ValueError(
                "PerturbedOptimizer: `stratified=True` maps stratified uniform numbers "
                "through the noise's quantile function, which "
                f"{type(self.noise).__name__} does not implement. Use sp.Gumbel() or "
                "sp.Normal(), or implement `quantile` on the noise."
            )
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(
                "PerturbedOptimizer: `chunk_size` must be None or an int >= 1, got "
                f"{self.chunk_size!r}."
            )
        if not isinstance(self.symmetric_jacobian, bool):
            raise TypeError(
                "PerturbedOptimizer: `symmetric_jacobian` must be True or False, got "
                f"{self.symmetric_jacobian!r}."
            )
        if self.jacobian not in _JACOBIANS:
            raise ValueError(
                f"PerturbedOptimizer: `jacobian` must be one of {_JACOBIANS}, got "
                f"{self.jacobian!r}."
            )
        if self.jacobian == "conditional":
            missing = self._conditional_missing()
            if missing:
                raise ValueError(
                    f"PerturbedOptimizer: `jacobian='conditional'` needs {missing}. "
                    "Use jacobian='score' (or 'auto', which picks it when possible)."
                )
        check_mesh(self.mesh, self.mesh_axes, "PerturbedOptimizer")

    def _conditional_missing(self) -> str:
        """What the conditional Jacobian estimator lacks here ('' if nothing)."""
        if exchanges_of(self.solver) is None:
            return (
                f"a solver that lists its exchange levels (`exchanges`; "
                f"{type(self.solver).__name__} does not)"
            )
        if not has_density(self.noise):
            return (
                f"a noise with `density` and `cdf` methods ({type(self.noise).__name__} "
                "lacks them)"
            )
        if self.perturbation != "additive":
            return "perturbation='additive'"
        return ""

    def _conditional(self, event_shape, dtype=jnp.float32) -> bool:
        """Whether the Jacobian is estimated by conditional Monte Carlo, for instances
        of `event_shape`: asked for, or with `jacobian="auto"` wherever it applies, no
        score-function control variate was chosen (`control_variate="auto"`) and its
        cost stays near the solver's: a solver whose entries exchange with every
        other one (partners None, the ranking: O(M d^2) arithmetic) only up to
        `_DENSE_AUTO_MAX` entries."""
        if self.jacobian != "auto":
            return self.jacobian == "conditional"
        if self.control_variate != "auto" or self._conditional_missing():
            return False
        dense = _dense_exchanges(self.solver, event_shape, dtype)
        return not dense or math.prod(event_shape) <= _DENSE_AUTO_MAX

    @property
    def _resolved_control_variate(self) -> str:
        """The control variate that `control_variate="auto"` stands for:
        `"covariance"` with `Normal` noise (independent or orthogonal draws), where it
        had the lowest error of the unbiased options in every case we measured, and
        `"leave_one_out"` otherwise (with `Gumbel` noise, whose heavy-tailed scores
        make the covariance correction noisier). Any other value is returned as is."""
        if self.control_variate != "auto":
            return self.control_variate
        if type(self.noise) is Normal:
            return "covariance"
        return "leave_one_out"

    def _invariant_axes(self, event_shape) -> tuple[int, ...]:
        """The solver's shift-invariant axes (`AbstractSolver`), for the Jacobian
        estimator of the additive perturbation (see `_invariant_free`)."""
        if self.perturbation != "additive":
            return ()
        return shift_invariant_axes(self.solver, event_shape)

    def _setup(self, theta, key, who: str):
        """Validate the inputs (at trace time); flatten the batch; build the config."""
        ndim = _check_theta(theta, self.solver.event_ndim, who)
        if not isinstance(key, jax.Array):
            raise TypeError(
                f"{who}: `key` must be a JAX PRNG key such as jax.random.key(0), got "
                f"{type(key).__name__}."
            )
        batch_shape = theta.shape[: theta.ndim - ndim]
        event_shape = theta.shape[theta.ndim - ndim :]
        out = jax.eval_shape(self.solver.argmax, jax.ShapeDtypeStruct(event_shape, theta.dtype))
        if out.shape != event_shape:
            raise ValueError(
                f"{who}: the solver {type(self.solver).__name__} returned shape "
                f"{out.shape} for an instance of shape {event_shape}; a solver's argmax "
                "must return y of the same shape as theta."
            )
        size = math.prod(event_shape)
        if self.control_variate == "regression" and size > _REGRESSION_MAX_SIZE:
            raise ValueError(
                f"{who}: `control_variate='regression'` builds a d x d matrix per "
                f"instance, and an instance has d = {size} entries (at most "
                f"{_REGRESSION_MAX_SIZE}). Use control_variate='leave_one_out'."
            )
        sigma = jnp.asarray(self.sigma, theta.dtype)
        if sigma.ndim != 0:
            raise ValueError(f"{who}: `sigma` must be a scalar, got shape {sigma.shape}.")
        if not isinstance(self.sigma, int | float):  # numbers were checked at construction
            sigma = eqx.error_if(sigma, sigma <= 0, f"{who}: `sigma` must be > 0.")
        cfg = _Config(
            solver=self.solver,
            noise=self.noise,
            num_samples=self.num_samples,
            event_ndim=ndim,
            perturbation=self.perturbation,
            control_variate=self._resolved_control_variate,
            antithetic=self.antithetic,
            chunk_size=self.chunk_size,
            mesh=self.mesh,
            mesh_axes=self.mesh_axes,
            symmetric_jacobian=self.symmetric_jacobian,
            orthogonal=self.orthogonal,
            stratified=self.stratified,
            invariant_axes=self._invariant_axes(event_shape),
            conditional=self._conditional(event_shape, theta.dtype),
        )
        flat = theta.reshape(-1, *event_shape)
        return flat, sigma, cfg, batch_shape

    def _run(self, theta, key, who: str):
        flat, sigma, cfg, batch_shape = self._setup(theta, key, who)
        streams = _streams(cfg, key, flat.shape[0], math.prod(flat.shape[1:]))
        kernel = _jit_streamed_kernel if streams else _jit_kernel
        y_eps, f_eps = kernel(flat, sigma, key, cfg=cfg)
        return y_eps.reshape(theta.shape), f_eps.reshape(batch_shape)

    def __call__(
        self, theta: Float[Array, "*batch_event"], *, key: PRNGKeyArray
    ) -> Float[Array, "*batch_event"]:
        """The perturbed argmax $y_\\varepsilon(\\theta)$.

        **Arguments:**

        - `theta`: objectives of shape `(*batch, *event)`, floating dtype.
        - `key`: a PRNG key (keyword-only), one for the whole batch.

        **Returns:** $y_\\varepsilon(\\theta)$, of the same shape and dtype as `theta`.
        """
        return self._run(theta, key, "PerturbedOptimizer")[0]

    def max(
        self, theta: Float[Array, "*batch_event"], *, key: PRNGKeyArray
    ) -> Float[Array, "*batch"]:
        """The perturbed max $F_\\varepsilon(\\theta)$, one value per instance.

        Its gradient with respect to `theta` is $y_\\varepsilon(\\theta)$ (pathwise,
        from the same solver pass).

        **Arguments:**

        - `theta`: objectives of shape `(*batch, *event)`, floating dtype.
        - `key`: a PRNG key (keyword-only).

        **Returns:** an array of shape `batch`.
        """
        flat, sigma, cfg, batch_shape = self._setup(theta, key, "PerturbedOptimizer.max")
        if _streams(cfg, key, flat.shape[0], math.prod(flat.shape[1:])):
            return _jit_streamed_max(flat, sigma, key, cfg=cfg).reshape(batch_shape)
        return _jit_kernel(flat, sigma, key, cfg=cfg)[1].reshape(batch_shape)

    def stats(
        self,
        theta: Float[Array, "*batch_event"],
        *,
        key: PRNGKeyArray,
        cotangent: Float[Array, "*batch_event"] | None = None,
    ) -> MonteCarloStats:
        """Monte-Carlo standard errors, from the samples the layer uses for `key`.

        Use it to choose `num_samples` and `sigma` from data: the estimates are those
        of `self(theta, key=key)`, `self.max(theta, key=key)` and (with a `cotangent`
        $v$) of `jax.grad` of $\\langle v, y_\\varepsilon(\\theta)\\rangle$, each with
        its standard error. Not differentiable (a diagnostic).

        **Arguments:**

        - `theta`: objectives of shape `(*batch, *event)`, floating dtype.
        - `key`: a PRNG key (keyword-only); the same key as the call to diagnose.
        - `cotangent`: optional, of the shape of `theta`: the gradient of your loss
          with respect to $y_\\varepsilon$ (for a loss $L(y_\\varepsilon)$, $v = \\nabla
          L(y_\\varepsilon)$), to get the standard error of the gradient that
          `jax.grad` propagates to `theta`.

        **Returns:** a [`structpert.MonteCarloStats`][].

        !!! Example

            ```python
            opt = sp.PerturbedOptimizer(sp.Permutahedron(), noise=sp.Normal(),
                                        sigma=0.5, num_samples=100)
            st = opt.stats(theta, key=key)
            print(st.y_eps_stderr.max())  # FY-loss gradient error, per coordinate
            # samples needed for a standard error of 0.01:
            m = int(100 * (st.y_eps_stderr.max() / 0.01) ** 2)
            ```
        """
        if cotangent is not None:
            cotangent = jnp.asarray(cotangent)
            if cotangent.shape != getattr(theta, "shape", None):
                raise ValueError(
                    "PerturbedOptimizer.stats: `cotangent` must have the shape of "
                    f"`theta` {getattr(theta, 'shape', None)}, got {cotangent.shape} "
                    "(it is the gradient of the loss with respect to y_eps)."
                )
        flat, sigma, cfg, batch_shape = self._setup(theta, key, "PerturbedOptimizer.stats")
        cot = None if cotangent is None else jnp.reshape(cotangent, flat.shape)
        st = _stats(flat, sigma, key, cot, cfg=cfg)
        return MonteCarloStats(
            y_eps=st.y_eps.reshape(theta.shape),
            y_eps_stderr=st.y_eps_stderr.reshape(theta.shape),
            max=st.max.reshape(batch_shape),
            max_stderr=st.max_stderr.reshape(batch_shape),
            vjp=None if st.vjp is None else st.vjp.reshape(theta.shape),
            vjp_stderr=None if st.vjp_stderr is None else st.vjp_stderr.reshape(theta.shape),
        )
