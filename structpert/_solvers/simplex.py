"""The unit simplex: one-hot argmax."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from .base import AbstractSolver, register_solver


@register_solver("simplex")
class Simplex(AbstractSolver):
    """One-hot argmax: $y^*(\\theta) = e_i$ with $i = \\arg\\max_j \\theta_j$.

    The vertices of the unit simplex. `theta` has shape `(n,)`; `y` is the one-hot
    vector of the largest entry. Ties go to the lowest index (as `jnp.argmax`).
    With [`structpert.Gumbel`][] noise, the perturbed argmax is exactly
    $\\mathrm{softmax}(\\theta/\\varepsilon)$.

    !!! Example

        ```python
        sp.Simplex().argmax(jnp.array([0.1, 2.0, -1.0]))  # [0., 1., 0.]
        ```
    """

    event_ndim: ClassVar[int] = 1

    def shift_invariant_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`(-1,)`: every solution has the same sum (1), so adding a constant to
        `theta` does not change it."""
        return (-1,)

    def exchanges(self, theta: Float[Array, " n"], y: Float[Array, " n"]):
        """One level per entry (`AbstractSolver`): entry i takes over, from the current
        winner, where it passes the largest other entry; the winner itself hands back
        to the runner-up below the runner-up's value."""
        winner = y > 0
        best = jnp.max(jnp.where(winner, theta, -jnp.inf))
        rest = jnp.where(winner, -jnp.inf, theta)
        runner_up = jnp.argmax(rest)
        level = jnp.where(winner, rest[runner_up], best)
        partner = jnp.where(winner, runner_up, jnp.argmax(y))
        return level[:, None], partner[:, None]

    def argmax(self, theta: Float[Array, " n"]) -> Float[Array, " n"]:
        n = theta.shape[-1]
        return (jnp.arange(n) == jnp.argmax(theta)).astype(theta.dtype)
