"""Top-k selection: the k-hot indicator of the k largest entries."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .base import AbstractSolver, register_solver


@register_solver("topk")
class TopK(AbstractSolver):
    """k-hot indicator of the `k` largest entries of `theta`.

    Maximises $\\langle y, \\theta\\rangle$ over $\\{y \\in \\{0,1\\}^n : \\sum_i y_i =
    k\\}$. `theta` has shape `(n,)` with `n >= k`. Ties are broken towards the lower
    index (as `jax.lax.top_k`). `TopK(1)` is [`structpert.Simplex`][].

    **Arguments:**

    - `k`: how many entries to select, a positive int.

    !!! Example

        ```python
        sp.TopK(2).argmax(jnp.array([0.3, -1.0, 2.0, 0.5]))  # [0., 0., 1., 1.]
        ```
    """

    k: int = eqx.field(static=True)
    event_ndim: ClassVar[int] = 1

    def shift_invariant_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """`(-1,)`: every solution has the same sum (k), so adding a constant to
        `theta` does not change it."""
        return (-1,)

    def __check_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"TopK: `k` must be a positive int, got {self.k!r}.")

    def exchanges(self, theta: Float[Array, " n"], y: Float[Array, " n"]):
        """One level per entry (`AbstractSolver`): an entry outside the set enters,
        in place of the weakest selected one, where it passes it; a selected entry
        leaves, for the strongest unselected one, below that one's value. Pivots:
        (weakest selected, strongest unselected)."""
        n = theta.shape[-1]
        index = jnp.arange(n)
        selected = y > 0
        inside = jnp.where(selected, theta, jnp.inf)
        outside = jnp.where(selected, -jnp.inf, theta)
        low, high = jnp.min(inside), jnp.max(outside)
        weakest = jnp.min(jnp.where(inside == low, index, n - 1))
        strongest = jnp.min(jnp.where(outside == high, index, n - 1))
        level = jnp.where(selected, high, low)
        slot = selected.astype(jnp.int32)
        return level[:, None], (slot[:, None], jnp.stack([weakest, strongest]))

    def argmax(self, theta: Float[Array, " n"]) -> Float[Array, " n"]:
        n = theta.shape[-1]
        if self.k > n:
            raise ValueError(
                f"TopK: `k`={self.k} is larger than the instance size n={n}; "
                "use k <= n."
            )
        _, idx = jax.lax.top_k(theta, self.k)
        return jnp.zeros(n, theta.dtype).at[idx].set(1)
