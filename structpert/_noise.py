"""Noise distributions for perturbed optimizers.

A noise distribution has a density $\\mu(z) \\propto \\exp(-\\nu(z))$ on each
coordinate (coordinates are independent). The layer needs two things from it: samples
and $\\nabla\\nu$, the score that enters the Jacobian estimator of Berthet et al.
(2020, Prop. 3.1).
"""

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray


class AbstractNoise(eqx.Module):
    """Base class for noise distributions $Z$ with density $\\mu \\propto e^{-\\nu}$.

    Subclass it to add a noise: implement `sample` and `grad_nu`, and set the class
    variable `symmetric` (whether $Z$ and $-Z$ have the same law, which makes
    antithetic sampling valid). Optionally set `elementwise = True` when each entry
    of `sample(key, shape, dtype)` is a function of its own random bits only (as for
    `jax.random.normal`); the layer then draws a whole batch in one call (see
    `PerturbedOptimizer`, **Keys**), which compiles faster.

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

        - `key`: a JAX PRNG key.
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
