"""Decision-quality metrics for predict-then-optimise with costs (minimisation).

Every function takes a batch of instances along the leading axis, with any event
shape after it (`(n, E)` edge vectors, `(n, H, W)` grids), accepts numpy or JAX
arrays, works under `jax.jit`, and returns a scalar. Costs are the true costs $c_i$
(positive, to be minimised); `y_pred` are the decisions taken with predicted costs and
`y_opt` the optimal decisions for the true costs.

!!! Example

    ```python
    from structpert import metrics

    y_pred = jax.vmap(solver.argmax)(-c_hat)     # decisions from predicted costs
    y_opt = jax.vmap(solver.argmax)(-c)          # optimal decisions
    metrics.normalized_regret(c, y_pred, y_opt)  # 0 is perfect
    ```
"""

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real, Shaped


def _objective(costs, y):
    costs = jnp.asarray(costs)
    y = jnp.asarray(y, dtype=costs.dtype)
    if costs.shape != y.shape or costs.ndim < 1:
        raise ValueError(
            f"metrics: `costs` and the decisions must have the same shape (n, ...), "
            f"got {costs.shape} and {y.shape}."
        )
    return jnp.sum((costs * y).reshape(costs.shape[0], -1), axis=1)


def objective(
    costs: Real[ArrayLike, " n *event"], y: Real[ArrayLike, " n *event"]
) -> Float[Array, " n"]:
    """The cost $c_i^\\top y_i$ of each decision.

    **Arguments:**

    - `costs`: true costs `(n, ...)`.
    - `y`: decisions of the same shape.

    **Returns:** an array of shape `(n,)`.

    !!! Example

        ```python
        metrics.objective(c, y)  # the cost of each path
        ```
    """
    return _objective(costs, y)


def normalized_regret(
    costs: Real[ArrayLike, " n *event"],
    y_pred: Real[ArrayLike, " n *event"],
    y_opt: Real[ArrayLike, " n *event"],
) -> Float[Array, ""]:
    """The normalized regret, a ratio of sums (PyEPO's definition):

    $$\\frac{\\sum_i c_i^\\top y_i^{\\text{pred}} - c_i^\\top y_i^{\\text{opt}}}
    {\\sum_i |c_i^\\top y_i^{\\text{opt}}|}.$$

    0 means every decision is optimal; 0.07 means the decisions cost 7% more than the
    optimal ones in total.

    **Arguments:**

    - `costs`: true costs `(n, ...)`.
    - `y_pred`: the decisions taken, same shape.
    - `y_opt`: optimal decisions for `costs`, same shape.

    **Returns:** a scalar.

    !!! Example

        ```python
        metrics.normalized_regret(c_test, y_pred, y_opt)
        ```
    """
    best = _objective(costs, y_opt)
    return jnp.sum(_objective(costs, y_pred) - best) / jnp.sum(jnp.abs(best))


def cost_ratio(
    costs: Real[ArrayLike, " n *event"],
    y_pred: Real[ArrayLike, " n *event"],
    y_opt: Real[ArrayLike, " n *event"],
) -> Float[Array, ""]:
    """The mean ratio of the cost of the decision taken to the optimal cost,
    $\\frac{1}{n}\\sum_i c_i^\\top y_i^{\\text{pred}} / c_i^\\top y_i^{\\text{opt}}$
    (the Warcraft benchmark's metric; 1 is perfect). Optimal costs must be positive.

    **Arguments:**

    - `costs`: true costs `(n, ...)`, positive.
    - `y_pred`: the decisions taken, same shape.
    - `y_opt`: optimal decisions for `costs`, same shape.

    **Returns:** a scalar.

    !!! Example

        ```python
        metrics.cost_ratio(costs, y_pred, y_opt)  # e.g. 1.02
        ```
    """
    return jnp.mean(_objective(costs, y_pred) / _objective(costs, y_opt))


def exact_match(
    y_pred: Shaped[ArrayLike, " n *event"], y_true: Shaped[ArrayLike, " n *event"]
) -> Float[Array, ""]:
    """The fraction of instances whose decision equals the target exactly (every
    entry within 0.5, so 0/1 decisions of any dtype compare as sets).

    **Arguments:**

    - `y_pred`: decisions `(n, ...)`.
    - `y_true`: targets, same shape.

    **Returns:** a scalar in [0, 1].

    !!! Example

        ```python
        metrics.exact_match(y_pred, y_opt)  # e.g. 0.85
        ```
    """
    y_pred = jnp.asarray(y_pred, dtype=float)
    y_true = jnp.asarray(y_true, dtype=float)
    if y_pred.shape != y_true.shape or y_pred.ndim < 1:
        raise ValueError(
            f"exact_match: `y_pred` and `y_true` must have the same shape (n, ...), got "
            f"{y_pred.shape} and {y_true.shape}."
        )
    diff = jnp.abs(y_pred - y_true).reshape(y_pred.shape[0], -1)
    return jnp.mean(jnp.all(diff < 0.5, axis=1).astype(y_pred.dtype))
