"""The permutahedron: ranks."""

from typing import ClassVar

import jax.numpy as jnp
from jaxtyping import Array, Float

from .base import AbstractSolver, register_solver


@register_solver("permutahedron")
class Permutahedron(AbstractSolver):
    """Ranks, 0-based and ascending: the smallest entry gets 0, the largest `n - 1`.

    Maximises $\\langle y, \\theta\\rangle$ over the permutations of
    $(0, 1, \\dots, n-1)$ (the vertices of the permutahedron). Computed with one
    stable sort and one scatter, not a double argsort. Ties: equal entries get
    increasing ranks in index order (the lower index gets the lower rank), the same
    as `jnp.argsort(jnp.argsort(theta))`.

    !!! Example

        ```python
        sp.Permutahedron().argmax(jnp.array([0.2, -1.3, 0.6]))  # [1., 0., 2.]
        ```
    """

    event_ndim: ClassVar[int] = 1

    def shift_invariant_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`(-1,)`: every solution has the same sum (n (n - 1) / 2), so adding a constant to
        `theta` does not change it."""
        return (-1,)

    def exchanges(self, theta: Float[Array, " n"], y: Float[Array, " n"]):
        """Every other entry is a level (`AbstractSolver`): as entry i passes entry
        j, i gains a rank and j loses one. `partners = None`: level k is entry k's
        value."""
        return jnp.broadcast_to(theta, (theta.shape[-1], theta.shape[-1])), None

    def argmax(self, theta: Float[Array, " n"]) -> Float[Array, " n"]:
        n = theta.shape[-1]
        order = jnp.argsort(theta, stable=True)
        return jnp.zeros(n, theta.dtype).at[order].set(jnp.arange(n, dtype=theta.dtype))
