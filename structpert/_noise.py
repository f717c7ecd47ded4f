"""Noise distributions for perturbed optimizers.

A noise distribution has a density $\\mu(z) \\propto \\exp(-\\nu(z))$ on each
coordinate (coordinates are independent). The layer needs two things from it: samples
and $\\nabla\\nu$, the score that enters the Jacobian estimator of Berthet et al.
(2020, Prop. 3.1).
"""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, UInt32


class AbstractNoise(eqx.Module):
    """Base class for noise distributions $Z$ with density $\\mu \\propto e^{-\\nu}$.

    Subclass it to add a noise: implement `sample` and `grad_nu`, and set the class
    variable `symmetric` (whether $Z$ and $-Z$ have the same law, which makes
    antithetic sampling valid). Optionally set `elementwise = True` when each entry
    of `sample(key, shape, dtype)` is a function of its own random bits only (as for
    `jax.random.normal`); the layer then draws a whole batch in one call (see
    `PerturbedOptimizer`, **Keys**), which compiles faster. Define a method
    `quantile(u)`, the inverse distribution function of one coordinate, to allow
    `stratified=True` (as `Gumbel` and `Normal` do), and methods `density(z)` and
    `cdf(z)`, the density and distribution function of one coordinate, to allow the
    conditional estimator (`jacobian="conditional"` of `PerturbedOptimizer`; `Gumbel`
    and `Normal` have them).

    !!! Example

        ```python
        class Logistic(sp.AbstractNoise):
            symmetric: ClassVar[bool] = True
            elementwise: ClassVar[bool] = True

            def sample(self, key, shape, dtype):
                return jax.random.logistic(key, shape, dtype)

            def grad_nu(self, z):
                return jnp.tanh(z / 2)
        ```
    """

    symmetric: eqx.AbstractClassVar[bool]
    elementwise: ClassVar[bool] = False

    @abc.abstractmethod
    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype: jnp.dtype
    ) -> Float[Array, "..."]:
        """Draw independent samples of the noise.

        **Arguments:**

        - `key`: a JAX PRNG key. The layer passes JAX's default Threefry keys
          rewrapped so that their random bits come from one fused kernel: the
          `jax.random` functions return the same numbers with it as with the
          original key.
        - `shape`: the shape of the sample.
        - `dtype`: a floating dtype.

        **Returns:** an array of `shape` and `dtype`.
        """

    @abc.abstractmethod
    def grad_nu(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        """$\\nabla\\nu(z) = -\\nabla \\log \\mu(z)$, elementwise.

        **Arguments:**

        - `z`: noise samples.

        **Returns:** an array of the same shape as `z`.
        """


def has_density(noise: AbstractNoise) -> bool:
    """Whether `noise` has `density` and `cdf` methods, the density and distribution
    function of one coordinate (`Gumbel`, `Normal`), which the conditional estimator
    needs."""
    return all(callable(getattr(type(noise), name, None)) for name in ("density", "cdf"))


def has_quantile(noise: AbstractNoise) -> bool:
    """Whether `noise` has a `quantile` method, the inverse of the distribution
    function of one coordinate (`Gumbel`, `Normal`), which stratified draws need."""
    return callable(getattr(type(noise), "quantile", None))


class Gumbel(AbstractNoise):
    """Standard Gumbel noise: $\\nu(z) = z + e^{-z}$, so $\\nabla\\nu(z) = 1 - e^{-z}$.

    With `Simplex`, the perturbed argmax is exactly $\\mathrm{softmax}(\\theta/\\varepsilon)$
    and the perturbed max is $\\varepsilon\\,\\mathrm{logsumexp}(\\theta/\\varepsilon) +
    \\varepsilon\\gamma$ ($\\gamma$ is Euler's constant, the mean of the Gumbel law).
    Not symmetric, so antithetic sampling does not apply.
    """

    symmetric: ClassVar[bool] = False
    elementwise: ClassVar[bool] = True

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype: jnp.dtype
    ) -> Float[Array, "..."]:
        return jax.random.gumbel(key, shape, dtype)

    def grad_nu(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        return 1.0 - jnp.exp(-z)

    def quantile(self, u: Float[Array, "..."]) -> Float[Array, "..."]:
        """The inverse distribution function, $-\\log(-\\log u)$, elementwise (for
        `stratified=True`)."""
        return -jnp.log(-jnp.log(u))

    def density(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        """The density $e^{-z - e^{-z}}$, elementwise (for `jacobian="conditional"`)."""
        return jnp.exp(-z - jnp.exp(-z))

    def cdf(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        """The distribution function $e^{-e^{-z}}$, elementwise (for
        `jacobian="conditional"`)."""
        return jnp.exp(-jnp.exp(-z))


class Normal(AbstractNoise):
    """Standard normal noise: $\\nu(z) = z^2/2$, so $\\nabla\\nu(z) = z$.

    Symmetric, so antithetic sampling applies. The perturbed argmax is the Gaussian
    smoothing of the solver; for two items it is the probit
    $\\Phi((\\theta_1 - \\theta_2)/(\\varepsilon\\sqrt{2}))$.
    """

    symmetric: ClassVar[bool] = True
    elementwise: ClassVar[bool] = True

    def sample(
        self, key: PRNGKeyArray, shape: tuple[int, ...], dtype: jnp.dtype
    ) -> Float[Array, "..."]:
        return jax.random.normal(key, shape, dtype)

    def grad_nu(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        return z

    def quantile(self, u: Float[Array, "..."]) -> Float[Array, "..."]:
        """The inverse distribution function $\\Phi^{-1}(u) = \\sqrt 2\\,
        \\mathrm{erf}^{-1}(2u - 1)$, elementwise (for `stratified=True`). As in
        `jax.random.normal`, $2u - 1$ is kept inside $(-1, 1)$, which bounds the result
        (by 5.4 in float32); one fused elementwise operation, where
        `jax.scipy.special.ndtri` takes several passes over the array."""
        x = 2 * u - 1
        one = jnp.ones((), x.dtype)
        x = jnp.clip(x, jnp.nextafter(-one, 0), jnp.nextafter(one, 0))
        return np.sqrt(2).astype(x.dtype) * jax.lax.erf_inv(x)

    def density(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        """The density $e^{-z^2/2} / \\sqrt{2\\pi}$, elementwise (for
        `jacobian="conditional"`)."""
        return jnp.exp(-(z**2) / 2) * np.asarray(1 / math.sqrt(2 * math.pi), z.dtype)

    def cdf(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        """The distribution function $\\Phi(z)$, elementwise (for
        `jacobian="conditional"`)."""
        return jax.scipy.special.ndtr(z)


def swap_rounds(num: int) -> int:
    """The number of swap-or-not rounds of `latin_hypercube` for `num` samples.

    In our measurements (rankings of 6 and 20 items, top-5 of 20, simplex of 5 and 100
    with Gumbel noise; 400 keys), the Latin hypercube's error matched that of uniformly
    random permutations (a sort of random keys) with 6 rounds up to 1000 samples, 8 at
    4000 and 9 at 16000, while fewer rounds left it up to 5 times higher; the rounds
    needed grow like log(num), and this rule keeps a margin of one or two."""
    return max(6, (num - 1).bit_length() - 3)


def hypercube_params(
    key: PRNGKeyArray, shape: tuple[int, ...], num: int
) -> tuple[UInt32[Array, "..."], UInt32[Array, "..."], UInt32[Array, "..."]]:
    """The random permutation and shift of each coordinate of a Latin hypercube of
    `num` samples (`latin_hypercube`), for coordinates of `shape`: the shift (*shape,
    1), uniform on 0..num-1, and the offsets and hash keys (*shape, R) of the R =
    `swap_rounds(num)` rounds. One draw each: entry i of a partitionable Threefry draw
    depends only on the key and i."""
    rounds = swap_rounds(num)
    key_shift, key_offset, key_hash = jax.random.split(key, 3)
    shift = jax.random.randint(key_shift, (*shape, 1), 0, num).astype(jnp.uint32)
    offsets = jax.random.randint(key_offset, (*shape, rounds), 0, num).astype(jnp.uint32)
    return shift, offsets, jax.random.bits(key_hash, (*shape, rounds), jnp.uint32)


def swap_or_not(
    x: UInt32[Array, "..."], offsets, hash_keys, num: int | UInt32[Array, "..."]
) -> UInt32[Array, "..."]:
    """A keyed permutation of 0..num-1, applied to x, for any num: the swap-or-not
    shuffle (Hoang, Morris and Rogaway, 2012). Round r pairs x with k_r - x (mod num)
    and swaps the two when one random bit of the pair (a hash of the larger) is set,
    so each round, hence the whole, is a bijection. Plain integer code: the
    permutation of entry x is computed where it is needed, without sorting."""
    n = jnp.asarray(num, jnp.uint32)
    for r in range(offsets.shape[-1]):
        k = offsets[..., r]
        partner = jnp.where(x > k, k + n - x, k - x)
        h = (jnp.maximum(x, partner) ^ hash_keys[..., r]) * np.uint32(0x9E3779B1)
        h = (h ^ (h >> np.uint32(16))) * np.uint32(0x85EBCA6B)
        x = jnp.where((h >> np.uint32(31)) == 1, partner, x)
    return x


def latin_hypercube(
    noise: AbstractNoise,
    u: Float[Array, "*batch count size"],
    params: tuple[UInt32[Array, "..."], UInt32[Array, "..."], UInt32[Array, "..."]],
    index: UInt32[Array, " count"],
    num: int,
) -> Float[Array, "*batch count size"]:
    """Samples `index` (of 0..num-1) of a Latin hypercube of `num` samples of `noise`:
    stratified in every coordinate.

    Coordinate j of sample m is `noise.quantile((s_mj + u_mj) / num)`, with u uniform
    on [0, 1) and the strata s_mj = (pi_j(m) + r_j) mod num: pi_j a random permutation
    (one per coordinate, independent; `swap_or_not`) and r_j a uniform random shift
    (`params` = `hypercube_params(...)` for the coordinates (*batch, size)). So the
    `num` samples of each coordinate take one value in each of `num` equally likely
    strata, which removes the part of the Monte-Carlo error that is additive in the
    coordinates, and each sample is still exactly the noise (the shift makes every
    stratum of every sample uniform and the coordinates independent, whatever the
    permutations). Every entry is computed on its own, so any subset of the samples
    can be drawn (a chunk of them, with the same values as in the whole draw).
    """
    shift, offsets, hash_keys = params
    x = jnp.broadcast_to(index[:, None], u.shape)
    strata = swap_or_not(x, offsets[..., None, :, :], hash_keys[..., None, :, :], num)
    strata = (strata + shift[..., None, :, 0]) % np.uint32(num)
    v = (strata.astype(u.dtype) + u) / num
    v = jnp.clip(v, jnp.finfo(u.dtype).tiny, jnp.nextafter(jnp.ones((), u.dtype), 0))
    return getattr(noise, "quantile")(v)


# Stratify the lengths of orthogonal samples up to this event size (see `_gamma_tails`).
_STRATIFY_MAX_SIZE = 64


def orthogonal_normal(
    key: PRNGKeyArray, num: int, event_shape: tuple[int, ...], dtype: jnp.dtype
) -> Float[Array, "..."]:
    """`num` standard normal vectors of `event_shape`, orthogonal in blocks.

    Each sample is exactly $N(0, I_d)$ ($d$ = the event size), but within a block of $k
    = \\min(num, d)$ samples the vectors are mutually orthogonal ("orthogonal Monte
    Carlo"), with stratified lengths for $d \\le 64$; blocks are independent. The directions are
    the Gram-Schmidt orthonormalisation of the columns of a Gaussian $d \\times k$
    matrix: Gram-Schmidt commutes with rotations, so each direction is uniform on the
    sphere. For $d \\le 64$ the lengths are drawn apart and stratified: the $k$ lengths
    of a block are the $\\chi_d$ quantiles of $(\\pi_j + U_j)/k$, with $\\pi$ a random
    permutation and $U_j$ uniform, so each is exactly $\\chi_d$ (one from each of $k$
    equally likely strata); for larger $d$, where $\\chi_d$ is narrow and stratifying
    made no measurable difference, they are the columns' own lengths, independent of
    their directions. A uniform direction times an independent $\\chi_d$ length is
    standard normal. Flipping the sign of one sample leaves the joint law unchanged,
    which keeps the leave-one-out baseline unbiased. Any orthonormalisation that
    commutes with rotations and sign flips has these properties, so rounding can cost
    orthogonality, never exactness of the law; the quantiles are exact to about 2e-6
    (relative, float32). On the CPU the orthonormalisation is Householder QR; elsewhere,
    where batched QR is slow, Cholesky QR (matrix products; see `_cholesky_qr`). Cost:
    $O(num \\cdot d \\cdot k)$.
    """
    d = math.prod(event_shape)
    k = min(num, d)
    blocks = -(-num // k)
    # no half-precision QR or Cholesky kernels: work in float32 at least
    work = jnp.promote_types(dtype, jnp.float32)
    key_dir, key_perm, key_unif = jax.random.split(key, 3)
    g = jax.random.normal(key_dir, (blocks, d, k), work)
    u = g / jnp.linalg.norm(g, axis=1, keepdims=True)
    q = jax.lax.platform_dependent(u, cpu=_householder_qr, default=_cholesky_qr)
    q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
    if d <= _STRATIFY_MAX_SIZE:
        # stratum of each length: a random permutation of 0..k-1 per block
        strata = jnp.argsort(jax.random.uniform(key_perm, (blocks, k)), axis=-1).astype(work)
        v = jax.random.uniform(key_unif, (blocks, k), work)
        lengths = _chi_quantile((strata + v) / k, (k - 1 - strata + (1 - v)) / k, d)
    else:  # chi_d is narrow: the columns' own lengths, independent of their directions
        lengths = jnp.linalg.norm(g, axis=1)
    z = jnp.swapaxes(q * lengths[:, None, :], 1, 2).reshape(blocks * k, *event_shape)[:num]
    return z.astype(dtype)


def _chi_quantile(p: Array, q: Array, d: int, iterations: int = 12) -> Array:
    """r with P(chi_d <= r) = p, given p and q = 1 - p (both, for accuracy in either
    tail), for d <= `_STRATIFY_MAX_SIZE`: Newton's method on the log of the smaller
    tail of x = r^2 / 2 ~ Gamma(d/2), in log x, from the Wilson-Hilferty
    approximation. Loop-free (`_gamma_tails`), so it is one fused kernel on a GPU,
    where the while loops of `jax.scipy.special.gammainc` cost milliseconds."""
    a = d / 2
    lower = p < 0.5
    z = jnp.where(lower, jax.scipy.special.ndtri(p), -jax.scipy.special.ndtri(q))
    c = 1 / (9 * a)
    t = math.log(a) + 3 * jnp.log(jnp.maximum(1 - c + z * math.sqrt(c), 0.05))
    # P(a, x) <= x^a / (a Gamma(a)): a lower bound on log x, for the far lower tail
    t = jnp.where(lower, jnp.maximum(t, (jnp.log(p) + math.log(a) + math.lgamma(a)) / a), t)
    log_p, log_q = jnp.log(p), jnp.log(q)
    for _ in range(iterations):
        x = jnp.exp(t)
        below, above = _gamma_tails(x, d)
        tail = jnp.maximum(jnp.where(lower, below, above), jnp.finfo(p.dtype).tiny)
        slope = jnp.exp(a * t - x - math.lgamma(a)) / tail  # |d log tail / d log x|
        h = jnp.where(lower, jnp.log(tail) - log_p, log_q - jnp.log(tail))
        t = t - jnp.clip(h / jnp.maximum(slope, 1e-30), -2.0, 2.0)
    return jnp.sqrt(2 * jnp.exp(t))


def _gamma_tails(x: Array, d: int, terms: int = 64) -> tuple[Array, Array]:
    """P(X <= x) and P(X > x) for X ~ Gamma(d/2), integer d <= 64, without loops: the
    lower tail by its power series e^-x x^a / Gamma(a + 1) sum_n x^n / ((a+1)..(a+n))
    (`terms` terms, enough below the median, where it is used), the upper tail by the
    finite sums of integer d (with erfc for odd d)."""
    a = d / 2
    term = total = jnp.ones_like(x)
    for n in range(1, terms):
        term = term * x / (a + n)
        total = total + term
    below = jnp.exp(a * jnp.log(x) - x - math.lgamma(a + 1)) * total
    if d % 2 == 0:  # e^-x sum_{j < d/2} x^j / j!
        term = total = jnp.ones_like(x)
        for j in range(1, d // 2):
            term = term * x / j
            total = total + term
        return below, jnp.exp(-x) * total
    root = jnp.sqrt(x)  # erfc(sqrt x) + e^-x sum_{j < (d-1)/2} x^(j+1/2) / Gamma(j + 3/2)
    above = jax.scipy.special.erfc(root)
    if d > 1:
        term = total = root / math.gamma(1.5)
        for j in range(1, (d - 1) // 2):
            term = term * x / (j + 0.5)
            total = total + term
        above = above + jnp.exp(-x) * total
    return below, above


def _householder_qr(u: Float[Array, "b d k"]) -> Float[Array, "b d k"]:
    """Q of u = QR with a positive diagonal in R: Gram-Schmidt, computed stably."""
    q, r = jnp.linalg.qr(u)
    diag = jnp.diagonal(r, axis1=-2, axis2=-1)
    return q * jnp.where(diag < 0, -1, 1).astype(u.dtype)[:, None, :]


def _cholesky_qr(u: Float[Array, "b d k"], passes: int = 3) -> Float[Array, "b d k"]:
    """Gram-Schmidt of the unit columns of u by shifted Cholesky QR: each pass maps
    u to u R^-1 with R^T R = u^T u + s I and renormalises the columns. The shift s
    (about 50 k times the rounding unit) keeps every Cholesky factorisation defined,
    however close to singular the block; each pass multiplies the smallest singular
    values by about 1/sqrt(s), so three passes orthonormalise to rounding all but
    the rarest blocks (and those only less orthogonal, never wrong in law)."""
    k = u.shape[-1]
    shift = 50 * k * float(jnp.finfo(u.dtype).eps)
    eye = jnp.eye(k, dtype=u.dtype)[None]
    for _ in range(passes):
        gram = jnp.einsum("bdi,bdj->bij", u, u, precision=jax.lax.Precision.HIGHEST)
        chol = jnp.linalg.cholesky(gram + shift * eye)
        u = jax.lax.linalg.triangular_solve(
            chol, u, left_side=False, lower=True, transpose_a=True
        )
        u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
    return u
