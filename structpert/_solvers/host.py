"""Host solvers: NumPy, SciPy or OR-Tools routines run through `jax.pure_callback`."""

from collections.abc import Callable

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float

from .base import AbstractBatchedSolver, as_tuple, check_invariant_axes


class _HostCall:
    """The Python function that runs on the host: flatten, solve, check, restore.

    Under `jax.vmap` (with `vmap_method="broadcast_all"`) the stack arrives with extra
    leading axes; they are folded into the one stack axis, so nested `vmap`s still make
    a single host call.
    """

    def __init__(self, fn, batched: bool, event_ndim: int, name: str):
        self.fn = fn
        self.batched = batched
        self.event_ndim = event_ndim
        self.name = name

    def __call__(self, thetas):
        thetas = np.asarray(thetas)
        lead = thetas.shape[: thetas.ndim - self.event_ndim]
        event = thetas.shape[thetas.ndim - self.event_ndim :]
        flat = thetas.reshape(-1, *event)
        if self.batched:
            ys = np.asarray(self.fn(flat))
        elif flat.shape[0] == 0:
            ys = np.zeros_like(flat)
        else:
            ys = np.stack([np.asarray(self.fn(t)) for t in flat])
        if ys.shape != flat.shape:
            got, want = (ys.shape, flat.shape) if self.batched else (ys.shape[1:], event)
            raise ValueError(
                f"HostSolver({self.name}): the host function returned shape {got} "
                f"for an input of shape {want}; it must return y of the same shape as "
                "theta."
            )
        return ys.astype(thetas.dtype).reshape(*lead, *event)


class HostSolver(AbstractBatchedSolver):
    """Use a solver that is not JAX code (NumPy, SciPy, NetworkX, OR-Tools, ...).

    The function runs on the host through `jax.pure_callback`, **once per batch**: the
    layer hands all `batch x num_samples` perturbed instances to one callback, which
    either passes the whole stack to `fn` (`batched=True`) or loops over the instances
    in Python (`batched=False`, the default). The output shape and dtype are declared
    to JAX (those of `theta`), so the solver works under `jax.jit`, `jax.grad` and
    `jax.vmap` with [`structpert.PerturbedOptimizer`][] and
    [`structpert.FenchelYoungLoss`][]; nested `jax.vmap`s still make a single host call
    (`vmap_method="broadcast_all"`, the extra axes are folded into the stack).

    The function must be pure (the same input gives the same output): JAX may call it
    again, or not at all if its result is unused. It receives NumPy arrays of the
    dtype of `theta` and may return any numeric or boolean array of the same shape;
    the result is cast to the dtype of `theta`. Setting `chunk_size` on the layer
    gives one host call per chunk instead.

    **Arguments:**

    - `fn`: the host function. With `batched=False`, `fn(theta) -> y` solves one
      instance (`theta` of the event shape); with `batched=True`, `fn(thetas) -> ys`
      solves a stack of shape `(N, *event)`.
    - `event_ndim`: how many trailing axes of `theta` make one instance (1 for a vector
      of item scores, 2 for a grid or a matrix).
    - `batched`: whether `fn` takes a whole stack (default `False`).
    - `invariant_axes`: the axes of an instance (negative ints) along which adding a
      constant to `theta` never changes `fn`'s result, e.g. `(-2, -1)` for a square
      assignment; see `shift_invariant_axes` on [`structpert.AbstractSolver`][].
      Default `()`: none.

    !!! Example

        ```python
        import numpy as np
        from scipy.optimize import linear_sum_assignment

        def assignment(theta):            # theta (n, n): maximise the total score
            rows, cols = linear_sum_assignment(theta, maximize=True)
            y = np.zeros_like(theta)
            y[rows, cols] = 1.0
            return y

        solver = sp.HostSolver(assignment, event_ndim=2, invariant_axes=(-2, -1))
        opt = sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=0.5,
                                    num_samples=16)
        ```
    """

    fn: Callable[..., object] = eqx.field(static=True)
    event_ndim: int = eqx.field(static=True)
    batched: bool = eqx.field(static=True)
    invariant_axes: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        fn: Callable[..., object],
        event_ndim: int = 1,
        batched: bool = False,
        invariant_axes: tuple[int, ...] = (),
    ):
        self.fn = fn
        self.event_ndim = event_ndim
        self.batched = batched
        self.invariant_axes = as_tuple(invariant_axes)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                "HostSolver: `fn` must be a callable, e.g. a function theta -> y "
                f"running NumPy/SciPy code, got {type(self.fn).__name__}."
            )
        if (
            not isinstance(self.event_ndim, int)
            or isinstance(self.event_ndim, bool)
            or self.event_ndim < 0
        ):
            raise ValueError(
                "HostSolver: `event_ndim` must be a non-negative int (1 for vectors, 2 "
                f"for grids or matrices), got {self.event_ndim!r}."
            )
        if not isinstance(self.batched, bool):
            raise TypeError(f"HostSolver: `batched` must be True or False, got {self.batched!r}.")
        check_invariant_axes(self.invariant_axes, self.event_ndim, "HostSolver")

    def shift_invariant_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The `invariant_axes` given at construction."""
        return self.invariant_axes

    def argmax_batch(self, thetas: Float[Array, " N *event"]) -> Float[Array, " N *event"]:
        if thetas.ndim != self.event_ndim + 1:
            raise ValueError(
                f"HostSolver: expected a stack of shape (N, *event) with "
                f"{self.event_ndim} event axes, got shape {thetas.shape}. Set "
                "`event_ndim` to the number of axes of one instance."
            )
        name = getattr(self.fn, "__name__", type(self.fn).__name__)
        host = _HostCall(self.fn, self.batched, self.event_ndim, name)
        out = jax.ShapeDtypeStruct(thetas.shape, thetas.dtype)
        return jax.pure_callback(host, out, thetas, vmap_method="broadcast_all")
