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
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._noise import AbstractNoise, Gumbel
from ._solvers.base import AbstractSolver, solve_batch


Perturbation = Literal["additive", "multiplicative"]
ControlVariate = Literal["none", "leave_one_out", "unperturbed"]
_PERTURBATIONS = ("additive", "multiplicative")
_CONTROL_VARIATES = ("none", "leave_one_out", "unperturbed")


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


def _draw_noise(cfg: _Config, key: PRNGKeyArray, batch: int, event_shape, dtype) -> Array:
    """Noise Z of shape (batch, M, *event): instance i uses `fold_in(key, i)`.

    Instance i therefore sees the same noise whatever the batch size, with or without
    `vmap`, and however the solver calls are split across chunks or devices.
    """
    m = cfg.num_samples

    def one_instance(k):
        if cfg.antithetic:
            z = cfg.noise.sample(k, (m // 2, *event_shape), dtype)
            return jnp.concatenate([z, -z], axis=0)
        return cfg.noise.sample(k, (m, *event_shape), dtype)

    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
    return jax.vmap(one_instance)(keys)


def _perturb(cfg: _Config, theta: Array, sigma: Array, z: Array) -> Array:
    """theta (B, *event), z (B, M, *event) -> perturbed objectives (B, M, *event)."""
    theta = theta[:, None]
    if cfg.perturbation == "additive":
        return theta + sigma * z
    return theta * jnp.exp(sigma * z - sigma**2 / 2)


def _solve_all(cfg: _Config, thetas: Array) -> Array:
    """Solve a stack (N, *event) in one pass, in chunks of `chunk_size` if set."""
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


def _forward(cfg: _Config, theta: Array, sigma: Array, key: PRNGKeyArray):
    """Draw, perturb and solve once. theta is (B, *event)."""
    b = theta.shape[0]
    event_shape = theta.shape[1:]
    m = cfg.num_samples
    z = _draw_noise(cfg, key, b, event_shape, theta.dtype)
    perturbed = _perturb(cfg, theta, sigma, z)
    stack = perturbed.reshape(b * m, *event_shape)
    if cfg.control_variate == "unperturbed" and not cfg.antithetic:
        stack = jnp.concatenate([stack, theta])
    y = _solve_all(cfg, stack).astype(theta.dtype)
    y_pert = y[: b * m].reshape(b, m, *y.shape[1:])
    y_plain = y[b * m :] if y.shape[0] > b * m else None
    return z, perturbed, y_pert, y_plain


def _flat_dot(a: Array, b: Array) -> Array:
    """Inner product over all axes after the first two (B, M, ...)."""
    return jnp.sum((a * b).reshape(a.shape[0], a.shape[1], -1), axis=-1)


def _reduce(theta_shape, perturbed: Array, y: Array):
    y_eps = jnp.mean(y, axis=1)
    if y.shape[2:] == theta_shape[1:]:
        f_eps = jnp.mean(_flat_dot(perturbed, y), axis=1)
    else:  # a general function (perturbations.make_perturbed_fun): no max value
        f_eps = jnp.zeros(theta_shape[:1], y.dtype)
    return y_eps, f_eps


@eqx.filter_custom_jvp
def _kernel(theta, sigma, key, *, cfg: _Config):
    """(y_eps (B, *out), F_eps (B,)) from one solver pass; theta is (B, *event)."""
    _, perturbed, y, _ = _forward(cfg, theta, sigma, key)
    return _reduce(theta.shape, perturbed, y)


@_kernel.def_jvp
def _kernel_jvp(primals, tangents, *, cfg: _Config):
    theta, sigma, key = primals
    t_theta, t_sigma, _ = tangents
    z, perturbed, y, y_plain = _forward(cfg, theta, sigma, key)
    y_eps, f_eps = _reduce(theta.shape, perturbed, y)
    b, m = y.shape[:2]
    d = math.prod(theta.shape[1:])
    multiplicative = cfg.perturbation == "multiplicative"
    grad_nu = cfg.noise.grad_nu(z)

    # score[b, m]: the directional derivative of log density of the m-th perturbed
    # objective along the tangent (Berthet et al. 2020, Prop. 3.1 and its analogues
    # for the multiplicative perturbation and for sigma).
    score = jnp.zeros((b, m), theta.dtype)
    # pathwise derivative of F_eps (envelope theorem): d<theta~, y*(theta~)> = <y*, d theta~>
    d_f = jnp.zeros((b,), theta.dtype)
    same_shape = y.shape[2:] == theta.shape[1:]
    if t_theta is not None:
        t = t_theta[:, None]
        if multiplicative:
            score = score + _flat_dot(grad_nu, jnp.broadcast_to(t / theta[:, None], z.shape)) / sigma
            if same_shape:
                factor = jnp.exp(sigma * z - sigma**2 / 2)  # d theta~ / d theta
                d_f = d_f + jnp.mean(_flat_dot(y, t * factor), axis=1)
        else:
            score = score + _flat_dot(grad_nu, jnp.broadcast_to(t, z.shape)) / sigma
            if same_shape:
                d_f = d_f + jnp.mean(_flat_dot(y, jnp.broadcast_to(t, z.shape)), axis=1)
    if t_sigma is not None:
        centred = (_flat_dot(grad_nu, z) - d) / sigma
        if multiplicative:
            centred = centred - jnp.sum(grad_nu.reshape(b, m, -1), axis=-1)
            if same_shape:
                d_f = d_f + t_sigma * jnp.mean(_flat_dot(y, perturbed * (z - sigma)), axis=1)
        elif same_shape:
            d_f = d_f + t_sigma * jnp.mean(_flat_dot(y, z), axis=1)
        score = score + t_sigma * centred

    # Control variate: subtract a baseline independent of the m-th noise (unbiased
    # because the score has mean zero). Antithetic pairs need none: any baseline
    # shared by a pair cancels out.
    if cfg.antithetic or cfg.control_variate == "none":
        centred_y = y
    elif cfg.control_variate == "unperturbed":
        assert y_plain is not None
        centred_y = y - y_plain[:, None]
    elif m > 1:  # leave-one-out mean of the other samples
        centred_y = (y - jnp.mean(y, axis=1, keepdims=True)) * (m / (m - 1))
    else:
        centred_y = y
    score_b = score.reshape(b, m, *([1] * (y.ndim - 2)))
    d_y = jnp.mean(centred_y * score_b, axis=1)
    return (y_eps, f_eps), (d_y, d_f)


# Compiled once per shape and configuration, so that eager calls do not dispatch the
# kernel op by op; inside a user's `jit` it is inlined.
_jit_kernel = eqx.filter_jit(_kernel)


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

    The Jacobian of $y_\\varepsilon$ is estimated by
    $J y_\\varepsilon(\\theta) \\approx \\frac{1}{M\\varepsilon}\\sum_m (y_m - b_m)
    \\nabla\\nu(Z_m)^\\top$ with a baseline $b_m$ (`control_variate`); the gradient of
    $F_\\varepsilon$ is the pathwise mean of the solutions.

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
    - `control_variate`: the baseline of the Jacobian estimator: `"leave_one_out"`
      (default; the mean of the other $M-1$ samples, free), `"unperturbed"`
      ($y^*(\\theta)$, one more solve per instance, in the same solver pass) or
      `"none"`. It changes only the variance of derivatives, never the values.
    - `antithetic`: draw the noise in pairs $(Z, -Z)$ (symmetric noise only, even
      `num_samples`); the pair then serves as its own control variate.
    - `chunk_size`: solve the `batch x num_samples` perturbed instances at most this
      many at a time (bounds the solver's working memory; same result for the same key).

    **Keys:** one key for the whole batch; instance $i$ (in row-major order over the
    batch axes) uses `jax.random.fold_in(key, i)`, so results do not depend on the
    batch size, on `vmap` or on chunking.

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
    control_variate: ControlVariate = eqx.field(default="leave_one_out", static=True)
    antithetic: bool = eqx.field(default=False, static=True)
    chunk_size: int | None = eqx.field(default=None, static=True)

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
        if self.chunk_size is not None and (
            not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(
                "PerturbedOptimizer: `chunk_size` must be None or an int >= 1, got "
                f"{self.chunk_size!r}."
            )

    def _run(self, theta, key, who: str):
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
        sigma = jnp.asarray(self.sigma, theta.dtype)
        if sigma.ndim != 0:
            raise ValueError(f"{who}: `sigma` must be a scalar, got shape {sigma.shape}.")
        sigma = eqx.error_if(sigma, sigma <= 0, f"{who}: `sigma` must be > 0.")
        cfg = _Config(
            solver=self.solver,
            noise=self.noise,
            num_samples=self.num_samples,
            event_ndim=ndim,
            perturbation=self.perturbation,
            control_variate=self.control_variate,
            antithetic=self.antithetic,
            chunk_size=self.chunk_size,
        )
        flat = theta.reshape(-1, *event_shape)
        y_eps, f_eps = _jit_kernel(flat, sigma, key, cfg=cfg)
        return y_eps.reshape(*batch_shape, *event_shape), f_eps.reshape(batch_shape)

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
        return self._run(theta, key, "PerturbedOptimizer.max")[1]
