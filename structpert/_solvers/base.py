"""The solver protocol, the one place that calls solvers, and the solver registry."""

import abc
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax
from jaxtyping import Array, Float


class AbstractSolver(eqx.Module):
    """An argmax oracle $y^*(\\theta) = \\arg\\max_{y \\in C} \\langle y, \\theta\\rangle$
    over one instance.

    Subclass it and implement `argmax`; set `event_ndim`, the number of trailing axes
    of $\\theta$ that make one instance (1 for a vector, 2 for a grid or a matrix). Any
    leading axes are batch axes, handled by the layer: a solver never sees noise,
    batches or devices. A solver that has a faster kernel for many instances at once
    subclasses [`structpert.AbstractBatchedSolver`][] instead.

    `argmax` must be a pure JAX function of `theta` (jittable and vmappable); it may
    return integer or boolean values, the layer casts them to the dtype of `theta`.
    Check static facts about the instance (shapes, sizes) in `argmax` and raise a
    `ValueError` that names the problem and the fix.

    **Optional: `shift_invariant_axes(shape)`.** A solver whose solution does not
    change when a constant is added to `theta` along some axes may say so by defining
    this method: for an instance of shape `shape`, it returns those axes as negative
    ints (`(-1,)`: adding $c$ to every entry of a vector, or $c_i$ to every entry of
    row $i$ of a matrix). This holds for an exact argmax whenever every feasible $y$
    has the same sums along the axis: a one-hot, a top-k, a permutation, the rows
    (and, for square instances, the columns) of an assignment. The layer then
    projects those directions, which the solution cannot depend on, out of its
    Jacobian estimator (out of the noise scores and out of the estimate): the same
    expectation, a lower error, no extra cost (see the guide "Gradient estimators").
    A wrong claim biases the gradients, so a solver that does not define it (the
    default) gets none of this.

    **Optional: `exchanges(theta, y)`.** A solver whose solution, as one entry
    $\\theta_i$ rises with the others fixed, changes only by handing a unit from some
    entry $p$ to entry $i$ ($y$ gains $e_i - e_p$), at levels of $\\theta_i$ set by the
    other entries alone, may list those levels. For the instance `theta` (of size $n$)
    and its solution `y`, it returns `(levels, partners)`: `levels` of shape `(n, K)`,
    entry `[i, k]` the $k$-th level at which $i$ takes over from its partner (a level
    of $\\pm\\infty$ means none), and `partners` either `None`, meaning $K = n$ and
    partner $k$ is entry $k$ (a level of entry $i$ with itself adds nothing), or a
    pair `(slots, pivots)` of ints: `pivots` of shape `(P,)` lists the few entries
    that partners are drawn from and `slots` of shape `(n, K)` says which, so the
    partner of `[i, k]` is `pivots[slots[i, k]]` (this keeps the layer's work at
    $O(nKP)$ per sample, without gathers over all entries). The layer then estimates
    the Jacobian by conditional Monte Carlo: for each sample and each entry, the
    expected change over that entry's own noise, in closed form from the noise's
    density at the levels (`jacobian` of `PerturbedOptimizer`). `Simplex` and `TopK`
    list one level per entry (pivots: the two entries at the boundary of the
    solution), `Permutahedron` every other entry. A wrong list biases the gradients.

    !!! Example

        ```python
        class Threshold(sp.AbstractSolver):
            event_ndim: ClassVar[int] = 1

            def argmax(self, theta):
                # maximise <y, theta> over y in {0, 1}^n: keep the positive entries
                return (theta > 0).astype(theta.dtype)
        ```
    """

    event_ndim: eqx.AbstractVar[int | None]

    @abc.abstractmethod
    def argmax(self, theta: Float[Array, "*event"]) -> Array:
        """Solve one instance.

        **Arguments:**

        - `theta`: the objective of one instance, of the solver's event shape.

        **Returns:** the maximiser $y^*(\\theta)$, usually of the same shape as `theta`.
        """


class AbstractBatchedSolver(AbstractSolver):
    """A solver with its own kernel for a stack of instances.

    Implement `argmax_batch(thetas)` for `thetas` of shape `(N, *event)`; `argmax` on
    one instance is derived from it. The layer calls `argmax_batch` once on all
    `batch x num_samples` perturbed instances instead of `jax.vmap(argmax)`.
    """

    @abc.abstractmethod
    def argmax_batch(self, thetas: Float[Array, " N *event"]) -> Array:
        """Solve a stack of instances along the leading axis.

        **Arguments:**

        - `thetas`: instances stacked on a leading axis of any length.

        **Returns:** the maximisers, stacked the same way.
        """

    def argmax(self, theta: Float[Array, "*event"]) -> Array:
        return self.argmax_batch(theta[None])[0]


def exchanges_of(solver: AbstractSolver) -> Callable[..., Any] | None:
    """The solver's optional `exchanges(theta, y)` (see `AbstractSolver`), or None."""
    exchanges = getattr(solver, "exchanges", None)
    return exchanges if callable(exchanges) else None


def shift_invariant_axes(solver: AbstractSolver, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The axes (negative, sorted) that `solver` declares shift-invariant for an
    instance of shape `shape` (see `AbstractSolver`); () when it declares none."""
    declare = getattr(solver, "shift_invariant_axes", None)
    if declare is None:
        return ()
    axes = tuple(declare(tuple(shape)))
    ndim = len(shape)
    if not _valid_axes(axes, ndim):
        raise ValueError(
            f"{type(solver).__name__}.shift_invariant_axes({tuple(shape)}) returned "
            f"{axes!r}; it must return distinct negative ints from -{ndim} to -1 (axes "
            "of one instance, counted from the end)."
        )
    return tuple(sorted(axes))


def solve_batch(solver: AbstractSolver, thetas: Array) -> Array:
    """Solve `thetas` of shape `(N, *event)`: the one place where solvers are called."""
    if isinstance(solver, AbstractBatchedSolver):
        return solver.argmax_batch(thetas)
    return jax.vmap(solver.argmax)(thetas)


class FunctionSolver(AbstractSolver):
    """Wrap any jittable function `fn(theta) -> y` as a solver.

    **Arguments:**

    - `fn`: a pure JAX function solving one instance.
    - `event_ndim`: how many trailing axes of `theta` make one instance. `None` (the
      default) means all of them: `theta` is one instance with no batch axes.
    - `invariant_axes`: the axes of an instance (negative ints) along which adding a
      constant to `theta` never changes `fn`'s result, e.g. `(-1,)` for ranks; see
      `shift_invariant_axes` on [`structpert.AbstractSolver`][]. Default `()`: none.

    !!! Example

        ```python
        solver = sp.FunctionSolver(lambda t: jnp.argsort(jnp.argsort(t)), event_ndim=1,
                                   invariant_axes=(-1,))
        opt = sp.PerturbedOptimizer(solver, sigma=0.2)
        ```
    """

    fn: Callable[[Array], Array] = eqx.field(static=True)
    event_ndim: int | None = eqx.field(default=None, static=True)
    invariant_axes: tuple[int, ...] = eqx.field(default=(), static=True)

    def __init__(
        self,
        fn: Callable[[Array], Array],
        event_ndim: int | None = None,
        invariant_axes: tuple[int, ...] = (),
    ):
        self.fn = fn
        self.event_ndim = event_ndim
        self.invariant_axes = as_tuple(invariant_axes)

    def __check_init__(self):
        if not callable(self.fn):
            raise TypeError(
                f"FunctionSolver: `fn` must be a callable theta -> y, got "
                f"{type(self.fn).__name__}."
            )
        if self.event_ndim is not None and (
            not isinstance(self.event_ndim, int) or self.event_ndim < 0
        ):
            raise ValueError(
                f"FunctionSolver: `event_ndim` must be a non-negative int or None, "
                f"got {self.event_ndim!r}."
            )
        check_invariant_axes(self.invariant_axes, self.event_ndim, "FunctionSolver")

    def argmax(self, theta: Float[Array, "*event"]) -> Array:
        return self.fn(theta)

    def shift_invariant_axes(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The `invariant_axes` given at construction."""
        return self.invariant_axes


def as_tuple(axes: Any) -> Any:
    """A list or tuple of axes as a tuple (hashable, for a static field); anything
    else as is, for `check_invariant_axes` to refuse."""
    return tuple(axes) if isinstance(axes, list | tuple) else axes


def _valid_axes(axes: Any, ndim: int | None) -> bool:
    """Whether `axes` is a tuple of distinct negative ints naming axes of an instance
    of `ndim` axes (any number of axes when `ndim` is None)."""
    low = -ndim if ndim is not None else -(2**31)
    return isinstance(axes, tuple) and len(set(axes)) == len(axes) and all(
        isinstance(a, int) and not isinstance(a, bool) and low <= a < 0 for a in axes
    )


def check_invariant_axes(axes: Any, event_ndim: int | None, who: str) -> None:
    """`invariant_axes` of a wrapper solver: distinct negative ints within the event."""
    if not _valid_axes(axes, event_ndim):
        raise ValueError(
            f"{who}: `invariant_axes` must be distinct negative ints naming axes of one "
            f"instance (at least -{event_ndim}), e.g. (-1,); got {axes!r}."
        )


_REGISTRY: dict[str, Callable[..., AbstractSolver]] = {}


def register_solver(name: str) -> Callable[[Any], Any]:
    """Register a solver class (or a plain argmax function) under a name.

    Configs can then build it with [`structpert.make_solver`][]. A plain function is
    registered as a factory of [`structpert.FunctionSolver`][] (with `event_ndim`
    taken from `make_solver`'s keyword arguments).

    **Arguments:**

    - `name`: a non-empty string, unique among registered solvers.

    **Returns:** a decorator that registers its argument and returns it unchanged.

    !!! Example

        ```python
        @sp.register_solver("threshold")
        class Threshold(sp.AbstractSolver):
            event_ndim: ClassVar[int] = 1

            def argmax(self, theta):
                return (theta > 0).astype(theta.dtype)

        solver = sp.make_solver("threshold")
        ```
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_solver: `name` must be a non-empty string, got {name!r}.")

    def decorator(obj: Any) -> Any:
        if name in _REGISTRY:
            raise ValueError(
                f"register_solver: a solver named {name!r} is already registered "
                f"({_REGISTRY[name]!r}). Pick another name."
            )
        if isinstance(obj, type) and issubclass(obj, AbstractSolver):
            _REGISTRY[name] = obj
        elif isinstance(obj, type):
            raise TypeError(
                f"register_solver({name!r}): {obj.__name__} is not a subclass of "
                "structpert.AbstractSolver. Subclass it, or register a plain function."
            )
        elif callable(obj):
            fn = cast(Callable[[Array], Array], obj)
            _REGISTRY[name] = lambda **kwargs: FunctionSolver(fn, **kwargs)
        else:
            raise TypeError(
                f"register_solver({name!r}): expected an AbstractSolver subclass or a "
                f"function, got {type(obj).__name__}."
            )
        return obj

    return decorator


def make_solver(name: str, **kwargs: Any) -> AbstractSolver:
    """Build a registered solver by name.

    **Arguments:**

    - `name`: a name from [`structpert.list_solvers`][].
    - `**kwargs`: passed to the solver's constructor, e.g. `k=3` for `"topk"`.

    **Returns:** the solver.

    !!! Example

        ```python
        solver = sp.make_solver("topk", k=3)
        ```
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"make_solver: unknown solver name {name!r}. Registered solvers: "
            f"{', '.join(sorted(_REGISTRY)) or '(none)'}. Register new ones with "
            "@structpert.register_solver(name)."
        ) from None
    return factory(**kwargs)


def list_solvers() -> list[str]:
    """The names of all registered solvers, sorted."""
    return sorted(_REGISTRY)
