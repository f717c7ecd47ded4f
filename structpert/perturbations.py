"""A drop-in successor of `jaxopt.perturbations`.

Replace `from jaxopt import perturbations` with `from structpert import perturbations`:
the same function names, argument names and defaults, and the same call signature
`f(inputs, rng)`. Each returned function treats all of `inputs` as one instance (as
jaxopt does; use `jax.vmap` with split keys for batches, or use
[`structpert.PerturbedOptimizer`][], which handles batch axes itself). Values agree
with jaxopt's in expectation; the random streams differ. Derivatives come from one
solver pass (jaxopt runs the solver twice under `jax.value_and_grad`).

Noise objects written for jaxopt (with `sample(seed, sample_shape)` and
`log_prob(x)`) are accepted too.
"""

from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._noise import AbstractNoise, Gumbel as Gumbel, Normal as Normal
from ._perturbed import _check_theta, _Config, _jit_kernel, PerturbedOptimizer
from ._solvers.base import FunctionSolver


class _JaxoptNoise(AbstractNoise):
    """Adapts a jaxopt-style noise object (`sample(seed, sample_shape)`, `log_prob`)."""

    legacy: Any = eqx.field(static=True)
    symmetric: ClassVar[bool] = False

    def sample(self, key, shape, dtype):
        return jnp.asarray(self.legacy.sample(key, shape), dtype)

    def grad_nu(self, z):
        log_prob = lambda x: jnp.sum(self.legacy.log_prob(x))
        return -jax.grad(log_prob)(z)


def _as_noise(noise: Any) -> AbstractNoise:
    if isinstance(noise, AbstractNoise):
        return noise
    if hasattr(noise, "sample") and hasattr(noise, "log_prob"):
        return _JaxoptNoise(noise)
    raise TypeError(
        "perturbations: `noise` must be structpert.Gumbel(), structpert.Normal(), "
        "another structpert.AbstractNoise, or an object with sample(seed, "
        f"sample_shape) and log_prob(x) methods; got {type(noise).__name__}."
    )


def _optimizer(argmax_fun, num_samples, sigma, noise, control_variate):
    return PerturbedOptimizer(
        FunctionSolver(argmax_fun),
        noise=_as_noise(noise),
        sigma=sigma,
        num_samples=num_samples,
        control_variate="unperturbed" if control_variate else "none",
    )


def make_perturbed_argmax(
    argmax_fun: Callable[[Array], Array],
    num_samples: int = 1000,
    sigma: float = 0.1,
    noise: Any = Gumbel(),
    control_variate: bool = False,
) -> Callable[[Array, Array], Array]:
    """Turn `argmax_fun` into its perturbed argmax `f(inputs, rng)`.

    **Arguments:**

    - `argmax_fun`: a jittable function `inputs -> y` of the same shape.
    - `num_samples`: noise draws per call.
    - `sigma`: noise scale.
    - `noise`: a noise distribution (default Gumbel).
    - `control_variate`: subtract `argmax_fun(inputs)` in the Jacobian estimator
      (computed in the same solver pass).

    **Returns:** `f(inputs, rng)`, differentiable in `inputs`.
    """
    opt = _optimizer(argmax_fun, num_samples, sigma, noise, control_variate)
    return lambda inputs, rng: opt(inputs, key=rng)


def make_perturbed_max(
    argmax_fun: Callable[[Array], Array],
    num_samples: int = 1000,
    sigma: float = 0.1,
    noise: Any = Gumbel(),
) -> Callable[[Array, Array], Array]:
    """Turn `argmax_fun` into the perturbed max `f(inputs, rng)`, a scalar whose
    gradient is the perturbed argmax.

    **Arguments:** as [`structpert.perturbations.make_perturbed_argmax`][].

    **Returns:** `f(inputs, rng)`, a scalar.
    """
    opt = _optimizer(argmax_fun, num_samples, sigma, noise, False)
    return lambda inputs, rng: opt.max(inputs, key=rng)


def make_perturbed_fun(
    fun: Callable[[Array], Array],
    num_samples: int = 1000,
    sigma: float = 0.1,
    noise: Any = Gumbel(),
    control_variate: bool = False,
) -> Callable[[Array, Array], Array]:
    """Perturbed version `f(inputs, rng) = E[fun(inputs + sigma Z)]` of any function.

    Unlike an argmax, `fun` may return any shape. Derivatives use the same
    score-function estimator as the perturbed argmax.

    **Arguments:** as [`structpert.perturbations.make_perturbed_argmax`][], with `fun`
    any jittable function of `inputs`.

    **Returns:** `f(inputs, rng)`, differentiable in `inputs`.
    """
    opt = _optimizer(fun, num_samples, sigma, noise, control_variate)

    def perturbed_fun(inputs, rng):
        _check_theta(inputs, None, "make_perturbed_fun")
        cfg = _Config(
            solver=opt.solver,
            noise=opt.noise,
            num_samples=opt.num_samples,
            event_ndim=inputs.ndim,
            perturbation=opt.perturbation,
            control_variate=opt.control_variate,
            antithetic=False,
            chunk_size=None,
        )
        sigma_ = jnp.asarray(opt.sigma, inputs.dtype)
        y_eps, _ = _jit_kernel(inputs[None], sigma_, rng, cfg=cfg)
        return y_eps[0]

    return perturbed_fun
