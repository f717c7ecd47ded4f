"""Spreading the solver calls over devices (`PerturbedOptimizer(..., mesh=...)`).

tests/conftest.py gives this process four CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=4`), so these tests run with every
plain `pytest`. Sharded and unsharded layers must agree to float tolerance for the
same key: the noise is drawn before the solver calls are split, so the number of
devices changes where a solve runs, never what is solved.
"""

import re
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import structpert as sp
from structpert._sharding import _num_cores


pytestmark = pytest.mark.skipif(
    jax.device_count() < 4,
    reason="needs 4 devices; tests/conftest.py sets "
    "XLA_FLAGS=--xla_force_host_platform_device_count=4 before JAX starts (a default "
    "GPU/TPU backend with fewer devices also lands here)",
)

KEY = jax.random.key(0)
ERRORS = (ValueError, TypeError, jaxtyping.TypeCheckError)
GATHERS = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")
# Small graphs, many compilations: skip LLVM's optimisations (halves compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _host_ranks(thetas):
    """A NumPy solver (stable double argsort): ranks, as sp.Permutahedron."""
    order = np.argsort(thetas, axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable")


def _solver_cases():
    """(id, solver, event shape, perturbation) for every solver structpert ships."""
    cases = [
        ("simplex", sp.Simplex(), (5,), "additive"),
        ("topk", sp.TopK(2), (5,), "additive"),
        ("permutahedron", sp.Permutahedron(), (5,), "additive"),
        ("host", sp.HostSolver(fn=_host_ranks, event_ndim=1, batched=True), (5,), "additive"),
    ]
    if hasattr(sp, "GridShortestPath"):
        cases.append(("grid", sp.GridShortestPath(), (4, 4), "multiplicative"))
    if hasattr(sp, "BipartiteMatching"):
        cases.append(("matching", sp.BipartiteMatching(), (3, 4), "additive"))
    if hasattr(sp, "GraphShortestPath"):
        # A DAG on 4 nodes with two routes and a shortcut: 0-1-3, 0-2-3, 0-3.
        graph = dict(
            senders=jnp.array([0, 0, 1, 2, 0]),
            receivers=jnp.array([1, 2, 3, 3, 3]),
            source=0,
            target=3,
        )
        cases.append(("graph", sp.GraphShortestPath(**graph), (5,), "multiplicative"))
    return cases


CASES = _solver_cases()
# Host callbacks on more CPU devices than cores can deadlock in XLA's CPU runtime (the
# layer warns, see test_host_callbacks_on_too_many_cpu_devices_warn): those cases use
# at most as many devices as this machine has cores.
CALLBACK_DEVICES = min(4, _num_cores()) if jax.default_backend() == "cpu" else 4


def test_every_shipped_solver_has_a_case():
    from structpert._solvers.base import _REGISTRY

    shipped = {
        cls for cls in _REGISTRY.values()
        if isinstance(cls, type) and cls.__module__.startswith("structpert._solvers")
    }
    covered = {type(solver) for _, solver, _, _ in CASES}
    assert shipped <= covered, f"add a case to _solver_cases for {shipped - covered}"


def _mesh(n, names=("devices",), shape=None, axis_type=AxisType.Explicit):
    shape = shape or (n,)
    return jax.make_mesh(
        shape, names, axis_types=(axis_type,) * len(names), devices=jax.devices()[:n]
    )


def _everything(opt, theta, tangent, jvp=True):
    """Values, reverse- and forward-mode derivatives of one layer, under jit and vmap.

    Two kernel calls: `value_and_grad` of the perturbed max gives F_eps and its
    (pathwise) gradient y_eps; `jvp` of the layer gives y_eps and the Jacobian
    estimator applied to `tangent` (skipped with `jvp=False`, for solvers that are
    slow to compile). vmap over the leading batch axis on top.
    """

    def one(theta, tangent):
        f, grad = jax.value_and_grad(lambda t: opt.max(t, key=KEY).sum())(theta)
        if not jvp:
            return dict(f=f, grad=grad)
        y, y_dot = jax.jvp(lambda t: opt(t, key=KEY), (theta,), (tangent,))
        return dict(f=f, grad=grad, y=y, y_dot=y_dot)

    return jax.jit(jax.vmap(one), compiler_options=FAST_COMPILE)(theta, tangent)


def _assert_same(got, want, rtol=1e-10):
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=rtol,
                                   err_msg=name)


@pytest.mark.parametrize("name, solver, event, perturbation", CASES,
                         ids=[c[0] for c in CASES])
def test_sharded_matches_unsharded(name, solver, event, perturbation):
    # batch (3, 2): 6 instances x 5 samples = 30 solves over 4 devices (2 padded)
    theta = -jax.random.uniform(jax.random.key(1), (3, 2, *event), minval=0.5, maxval=2)
    tangent = jax.random.normal(jax.random.key(2), theta.shape)

    def layer(mesh):
        return sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=0.3, num_samples=5,
                                     perturbation=perturbation, mesh=mesh)

    # Forward mode too for the quick-to-compile solvers; the others are checked on
    # values and gradients (the path through the layer is the same for all).
    jvp = name in ("simplex", "topk", "permutahedron", "host")
    callbacks = name == "host" or (name == "matching" and solver.resolved_method(3) == "scipy")
    want = _everything(layer(None), theta, tangent, jvp)
    got = _everything(layer(_mesh(CALLBACK_DEVICES if callbacks else 4)), theta, tangent, jvp)
    _assert_same(got, want)
    # The comparison has teeth: the outputs are neither constant nor zero.
    assert np.ptp(np.asarray(want["grad"])) > 0
    assert not jvp or np.any(np.asarray(want["y_dot"]) != 0)


def test_any_device_count_mesh_shape_and_chunking():
    # vmapped over 1 x 5 instances x 3 samples = 15 solves: no device count divides it
    theta = jax.random.normal(jax.random.key(3), (1, 5, 7))
    tangent = jax.random.normal(jax.random.key(4), theta.shape)
    base = sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.5, num_samples=3)
    want = _everything(base, theta, tangent)
    mesh2d, mesh4 = _mesh(4, ("a", "b"), (2, 2)), _mesh(4)
    # label: (mesh, mesh_axes, chunk_size, theta placed on the mesh)
    variants = {
        "3 devices, auto axes, chunks of 2": (
            _mesh(3, axis_type=AxisType.Auto), None, 2, False
        ),
        "2x2 mesh, axis b only": (mesh2d, "b", None, False),
        # replicated on an explicit mesh: typed, so the layer follows the types
        "4 devices, theta placed on the mesh": (mesh4, None, None, True),
    }
    for label, (mesh, axes, chunk, placed) in variants.items():
        opt = sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.5, num_samples=3,
                                    mesh=mesh, mesh_axes=axes, chunk_size=chunk)
        args = (theta, tangent)
        if placed:
            args = [jax.device_put(x, NamedSharding(mesh, P())) for x in args]
        got = _everything(opt, args[0], args[1])
        try:
            _assert_same(got, want)
        except AssertionError as e:
            raise AssertionError(label) from e


def test_float32_eager_and_set_mesh():
    mesh = _mesh(4)
    theta = jax.random.normal(jax.random.key(4), (8, 5), dtype=jnp.float32)
    want = sp.PerturbedOptimizer(sp.TopK(2), sigma=0.5, num_samples=6)(theta, key=KEY)
    opt = sp.PerturbedOptimizer(sp.TopK(2), sigma=0.5, num_samples=6, mesh=mesh)
    got = opt(theta, key=KEY)  # eager, theta on one device
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Eager reverse mode on an explicitly sharded theta (JAX wants the mesh context):
    # the gradient of the summed perturbed max, as without the mesh.
    single = sp.PerturbedOptimizer(sp.TopK(2), sigma=0.5, num_samples=6)
    want_grad = jax.grad(lambda t: single.max(t, key=KEY).sum())(theta)
    with jax.set_mesh(mesh):
        placed = jax.device_put(theta, NamedSharding(mesh, P("devices")))
        grad = jax.grad(lambda t: opt.max(t, key=KEY).sum())(placed)
    assert grad.sharding.spec[0] == "devices"
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)


def _collectives(compiled_text):
    return {op: len(re.findall(rf"\b{op}(-start)?\(", compiled_text)) for op in GATHERS}


def test_batch_sharded_theta_needs_no_gather():
    mesh = _mesh(4)
    theta = jax.random.normal(jax.random.key(5), (8, 6))
    y_true = jnp.zeros_like(theta).at[:, 1].set(1.0)
    opt = sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.5, num_samples=6, mesh=mesh)
    loss = sp.FenchelYoungLoss(opt)
    step = jax.jit(jax.value_and_grad(lambda t, y: loss(t, y, key=KEY).sum()),
                   compiler_options=FAST_COMPILE)
    plain = sp.FenchelYoungLoss(
        sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.5, num_samples=6)
    )
    want = jax.jit(jax.value_and_grad(lambda t: plain(t, y_true, key=KEY).sum()),
                   compiler_options=FAST_COMPILE)(theta)

    rows = NamedSharding(mesh, P("devices"))
    sharded = [jax.device_put(x, rows) for x in (theta, y_true)]
    compiled = step.lower(*sharded).compile()
    text = compiled.as_text()
    assert not any(_collectives(text).values()), _collectives(text)
    ell, grad = compiled(*sharded)
    assert grad.sharding.spec[0] == "devices"  # stays where the data lives
    np.testing.assert_allclose(grad, want[1], rtol=1e-12)
    np.testing.assert_allclose(ell, want[0], rtol=1e-12)

    # The detector sees gathers when they are needed: replicated theta means every
    # device must end up with every solution.
    replicated = [jax.device_put(x, NamedSharding(mesh, P())) for x in (theta, y_true)]
    text = step.lower(*replicated).compile().as_text()
    assert _collectives(text)["all-gather"] > 0


def test_host_solver_is_called_once_per_device():
    shapes = []

    def ranks(thetas):
        shapes.append(thetas.shape)
        return _host_ranks(thetas)

    solver = sp.HostSolver(fn=ranks, event_ndim=1, batched=True)
    theta = jax.random.normal(jax.random.key(6), (6, 5))
    d = CALLBACK_DEVICES
    opt = sp.PerturbedOptimizer(solver, sigma=0.5, num_samples=5, mesh=_mesh(d))
    f = jax.jit(jax.value_and_grad(lambda t: opt.max(t, key=KEY).sum()))
    jax.block_until_ready(f(theta))
    # 30 solves (padded to 32 on 4 devices): one host call per device, for the value
    # and the gradient together.
    assert sorted(shapes) == [(-(-30 // d), 5)] * d


def test_host_callbacks_on_too_many_cpu_devices_warn(monkeypatch):
    import structpert._sharding as sharding

    monkeypatch.setattr(sharding, "_num_cores", lambda: 1)
    theta = jax.random.normal(jax.random.key(6), (6, 5))
    host = sp.HostSolver(fn=_host_ranks, event_ndim=1, batched=True)
    for solver, warns in ((host, True), (sp.Permutahedron(), False)):
        opt = sp.PerturbedOptimizer(solver, sigma=0.5, num_samples=5, mesh=_mesh(2))
        step = jax.jit(lambda t, opt=opt: opt.max(t, key=KEY).sum())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step.lower(theta)  # traced only, never run
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        assert any("deadlock" in m for m in messages) == warns, messages


def test_layer_with_mesh_is_a_pytree():
    def layer(mesh):
        return sp.PerturbedOptimizer(sp.Simplex(), sigma=jnp.asarray(0.5), num_samples=4,
                                     mesh=mesh)

    opt = layer(_mesh(4))
    assert len(jax.tree.leaves(opt)) == 1  # sigma; the mesh is static metadata
    hash(jax.tree.structure(opt))
    theta = jnp.array([[0.1, 0.9, -0.3], [1.0, 0.0, 0.2]])
    y_true = jnp.eye(3)[:2]

    @eqx.filter_jit
    def loss_and_sigma_grad(fy):
        total = lambda fy: fy(theta, y_true, key=KEY).sum()
        return total(fy), eqx.filter_grad(total)(fy).optimizer.sigma

    got = loss_and_sigma_grad(sp.FenchelYoungLoss(opt))
    want = loss_and_sigma_grad(sp.FenchelYoungLoss(layer(None)))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert want[1] != 0  # sigma gets a gradient (it stays trainable)


def test_mesh_argument_errors():
    mesh = _mesh(4)
    with pytest.raises(ERRORS, match="mesh"):
        sp.PerturbedOptimizer(sp.Simplex(), mesh=jax.devices())  # pyright: ignore
    with pytest.raises(ERRORS, match="mesh_axes"):
        sp.PerturbedOptimizer(sp.Simplex(), mesh=mesh, mesh_axes="batch")
    with pytest.raises(ERRORS, match="mesh_axes"):
        sp.PerturbedOptimizer(sp.Simplex(), mesh=mesh, mesh_axes=("devices", "devices"))
    with pytest.raises(ERRORS, match="mesh_axes"):
        sp.PerturbedOptimizer(sp.Simplex(), mesh_axes="devices")
