"""The Fenchel-Young loss of a perturbed optimizer."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._perturbed import PerturbedOptimizer


class FenchelYoungLoss(eqx.Module):
    """The perturbed Fenchel-Young loss (Berthet et al. 2020, section 4).

    `loss(theta, y_true, key=key)` returns, for each instance,

    $$\\ell(\\theta; y) = F_\\varepsilon(\\theta) - \\langle \\theta, y \\rangle,$$

    the perturbed max minus the score of the target. The paper's loss is
    $L_\\varepsilon(\\theta; y) = F_\\varepsilon(\\theta) + \\varepsilon\\Omega(y) -
    \\langle\\theta, y\\rangle \\ge 0$; the term $\\varepsilon\\Omega(y)$ depends on $y$
    only (it has no closed form in general), so it is left out: the value here may be
    negative, but its gradient is the paper's,

    $$\\nabla_\\theta \\ell = y_\\varepsilon(\\theta) - y,$$

    computed pathwise from the **same** single solver pass as the value (no Jacobian
    estimator is involved, so it has low variance). For Gumbel noise on the simplex,
    $F_\\varepsilon(\\theta) = \\varepsilon\\,\\mathrm{logsumexp}(\\theta/\\varepsilon) +
    \\varepsilon\\gamma$ in expectation.

    **Arguments:**

    - `optimizer`: a [`structpert.PerturbedOptimizer`][]; its solver, noise, `sigma`
      and `num_samples` define the loss.

    !!! Example

        ```python
        loss = sp.FenchelYoungLoss(sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.1))
        ell = loss(theta, y_true, key=key)          # shape: theta's batch shape
        grads = jax.grad(lambda t: loss(t, y_true, key=key).mean())(theta)
        ```
    """

    optimizer: PerturbedOptimizer

    def __check_init__(self):
        if not isinstance(self.optimizer, PerturbedOptimizer):
            raise TypeError(
                "FenchelYoungLoss: `optimizer` must be a structpert.PerturbedOptimizer, "
                f"got {type(self.optimizer).__name__}. Build one with "
                "sp.PerturbedOptimizer(solver, noise, sigma, num_samples)."
            )

    def __call__(
        self,
        theta: Float[Array, "*batch_event"],
        y_true: Float[Array, "*batch_event"],
        *,
        key: PRNGKeyArray,
    ) -> Float[Array, "*batch"]:
        """The loss of each instance.

        **Arguments:**

        - `theta`: predicted objectives `(*batch, *event)`, floating dtype.
        - `y_true`: target structures of the same shape as `theta`.
        - `key`: a PRNG key (keyword-only).

        **Returns:** an array of shape `batch`.
        """
        y_true = jnp.asarray(y_true)
        if getattr(theta, "shape", None) != y_true.shape:
            raise ValueError(
                f"FenchelYoungLoss: `y_true` has shape {y_true.shape} but `theta` has "
                f"shape {getattr(theta, 'shape', None)}; they must be equal (one target "
                "structure per instance)."
            )
        f_eps = self.optimizer.max(theta, key=key)
        ndim = theta.ndim - f_eps.ndim
        score = jnp.sum(theta * y_true.astype(theta.dtype), axis=tuple(range(-ndim, 0)))
        return f_eps - score
