"""Spreading the solver calls of a perturbed optimizer over the devices of a mesh.

The layer flattens `batch x num_samples` perturbed instances into one stack of shape
`(N, *event)` and calls the solver once on it (`_perturbed._solve_all`). With a mesh,
that one call becomes a `jax.shard_map` over the chosen mesh axes:

    stack (N, *event)
      -> pad to a multiple of D (the number of devices along the axes), repeating the
         last instance, which is a valid input for every solver
      -> shard_map: device d solves rows [d N'/D, (d+1) N'/D) of the padded stack
      -> drop the padding                                   -> Y (N, *out)

Everything else (noise, perturbation, averages, derivatives) stays outside the
`shard_map`, written as ordinary array code that XLA partitions itself. The noise of
instance i depends only on the key and i and is drawn before the stack is built, so the result
does not depend on the number of devices: sharding changes where a solve runs, never
what is solved.

The stack is batch-major (row `i * M + m` is sample m of instance i), so when theta is
already sharded over its batch axis and the batch divides evenly, the block of rows a
device receives is exactly its own instances' samples: no gather is needed.
"""

import math
import os
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array


MeshAxes = str | tuple[str, ...] | None


def check_mesh(mesh: Any, mesh_axes: Any, who: str) -> None:
    """Validate the `mesh` and `mesh_axes` arguments of a layer (Python values only)."""
    if mesh is None:
        if mesh_axes is not None:
            raise ValueError(
                f"{who}: `mesh_axes`={mesh_axes!r} was given without a `mesh`. Pass "
                "`mesh=jax.make_mesh((num_devices,), ('devices',))` (or any "
                "jax.sharding.Mesh) as well, or drop `mesh_axes`."
            )
        return
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"{who}: `mesh` must be a jax.sharding.Mesh or None, got "
            f"{type(mesh).__name__}. Build one with "
            "`jax.make_mesh((jax.device_count(),), ('devices',))`."
        )
    if not (hasattr(jax, "shard_map") and hasattr(jax, "reshard")):
        raise ValueError(
            f"{who}: `mesh` needs `jax.shard_map` and `jax.reshard` (jax >= 0.7); the "
            f"installed jax is {jax.__version__}. Upgrade jax, or drop `mesh`."
        )
    mesh_axis_tuple(mesh, mesh_axes, who)


def mesh_axis_tuple(mesh: Mesh, mesh_axes: MeshAxes, who: str = "shard_solve") -> tuple:
    """The mesh axes to spread the solves over, as a tuple (all of them for None)."""
    if mesh_axes is None:
        return tuple(mesh.axis_names)
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    if not isinstance(axes, tuple) or not axes or not all(isinstance(a, str) for a in axes):
        raise TypeError(
            f"{who}: `mesh_axes` must be None, an axis name or a non-empty tuple of "
            f"axis names of the mesh, got {mesh_axes!r}."
        )
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown or len(set(axes)) != len(axes):
        raise ValueError(
            f"{who}: `mesh_axes`={mesh_axes!r} must name distinct axes of the mesh, "
            f"whose axes are {tuple(mesh.axis_names)}."
        )
    return tuple(axes)


def shard_solve(
    solve: Callable[[Any, Array], Array],
    params: Any,
    thetas: Array,
    mesh: Mesh,
    mesh_axes: MeshAxes = None,
) -> Array:
    """Apply `solve(params, thetas)` to a stack `thetas` (N, *event), split over a mesh.

    `solve` must treat the rows of `thetas` independently (a batched argmax). The
    stack is padded to a multiple of the number of devices D along `mesh_axes` by
    repeating its last row, split into D contiguous blocks, one per device, and the
    padding is dropped from the result. `params` (here: the layer's configuration,
    holding the solver) is a pytree whose array leaves are passed to every device
    replicated, so solvers holding arrays, even traced ones, work unchanged.

    Mesh axes not in `mesh_axes` see the same block on each of their devices (the
    solve is replicated along them).
    """
    axes = mesh_axis_tuple(mesh, mesh_axes)
    d = math.prod(mesh.shape[a] for a in axes)
    n = thetas.shape[0]
    pad = (-n) % d
    rows = PartitionSpec(axes)
    dynamic, static = eqx.partition(params, eqx.is_array)
    # Explicit sharding (`jax.make_mesh`'s default axis type) writes shardings into
    # array types. Follow it only when theta itself is typed with explicit axes (the
    # user placed it on the mesh); otherwise run the mesh as `Auto`, so no mesh type
    # leaks into the outputs and the layer behaves exactly as without a mesh.
    explicit = bool(getattr(jax.typeof(thetas).sharding.mesh, "explicit_axes", ()))
    in_rows = None
    if explicit:
        # Move the stack to the row split by hand (a no-op when theta is already
        # sharded over its batch axis and nothing is padded); the result goes back
        # to the stack's own sharding at the end.
        in_rows = jax.typeof(thetas).sharding.spec[0]
        if pad:
            thetas = _reshard(thetas, mesh, PartitionSpec())
        dynamic = jax.tree.map(lambda x: _reshard(x, mesh, PartitionSpec()), dynamic)
    elif getattr(mesh, "explicit_axes", ()):
        auto = (jax.sharding.AxisType.Auto,) * mesh.devices.ndim
        mesh = Mesh(mesh.devices, mesh.axis_names, auto)
    if pad:
        # The last row lives on the last device when `thetas` is already sharded.
        filler = jnp.broadcast_to(thetas[-1:], (pad, *thetas.shape[1:]))
        thetas = jnp.concatenate([thetas, filler])
    if explicit:
        thetas = _reshard(thetas, mesh, rows)

    def local(dynamic_, block):
        return solve(eqx.combine(dynamic_, static), block)

    _warn_cpu_callbacks(local, dynamic, thetas, mesh)

    # check_vma=False: the body has no collectives, and it lets solvers with loops,
    # scatters into constants or host callbacks run without replication annotations.
    ys = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(), rows),
        out_specs=rows,
        check_vma=False,
    )(dynamic, thetas)
    if not explicit:
        return ys[:n] if pad else ys
    if pad:
        ys = _reshard(ys, mesh, PartitionSpec())[:n]
    return _reshard(ys, mesh, PartitionSpec(in_rows))


def _num_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _warn_cpu_callbacks(local, dynamic, thetas: Array, mesh: Mesh) -> None:
    """Warn when a solver that calls back into Python is spread over more CPU devices
    than the machine has cores: XLA's CPU runtime can then deadlock in the collective
    that follows the callbacks (seen with jax 0.10: 4 host devices on 2 cores stop
    after 40 s with a "Termination timeout for `all reduce`" error; 2 on 2 cores and 8
    on 16 cores run)."""
    devices = mesh.devices.size
    if mesh.devices.flat[0].platform != "cpu" or devices <= _num_cores():
        return
    block = jax.ShapeDtypeStruct((1, *thetas.shape[1:]), thetas.dtype)
    if _calls_back(jax.make_jaxpr(local)(dynamic, block).jaxpr):
        warnings.warn(
            f"the solver calls back into Python (a host callback) and is spread over "
            f"{devices} CPU devices on a machine with {_num_cores()} cores: XLA's CPU "
            "runtime can deadlock there (it stops after 40 s with a 'Termination "
            "timeout' error). Use a mesh of at most as many CPU devices as cores; more "
            "devices do not make host callbacks faster anyway.",
            RuntimeWarning,
            stacklevel=2,
        )


def _calls_back(jaxpr) -> bool:
    """Whether a jaxpr (or any jaxpr nested in it) has a host-callback primitive."""
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _calls_back(inner):
                    return True
    return False


def _reshard(x: Array, mesh: Mesh, spec: PartitionSpec) -> Array:
    return jax.reshard(x, NamedSharding(mesh, spec))
