"""One process of the two-process check in tests/test_multiprocess.py (not a test file).

    python tests/_multiprocess_worker.py PORT PROCESS_ID NUM_PROCESSES OUT.npz

Each process owns `--xla_force_host_platform_device_count` CPU devices (set by the
caller in XLA_FLAGS); `jax.distributed.initialize` joins them into one runtime whose
mesh spans all processes, with gloo CPU collectives over the loopback interface. The
process computes the sharded layer's outputs and gradients under `jax.jit`, gathers
them to every process and saves them for the test to compare with one process.
"""

import socket
import sys
from functools import partial


def _use_loopback_gloo() -> None:
    """Make gloo listen on 127.0.0.1 even if this host's name resolves elsewhere.

    JAX hands gloo no address, so gloo binds the address the host name resolves to;
    that is the loopback interface on most machines (then nothing is changed). If it is
    not, build the CPU backend with loopback collectives through JAX internals.
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        address = ""
    if address.startswith("127."):
        return
    from jax._src import distributed, xla_bridge
    from jax._src.lib import _jax  # pyright: ignore[reportPrivateImportUsage]

    def factory():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname="127.0.0.1"
        )
        return xla_bridge.make_cpu_client(collectives=collectives)

    xla_bridge.register_backend_factory("cpu", factory, priority=0, fail_quietly=False)


def main(port: int, process_id: int, num_processes: int, out: str) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=30,
    )
    _use_loopback_gloo()

    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    import structpert as sp

    # The recipe of docs/multi_device.md: one mesh over every device of every process.
    mesh = jax.make_mesh((jax.device_count(),), ("devices",))
    processes = sorted({d.process_index for d in mesh.devices.flat})
    opt = sp.PerturbedOptimizer(
        sp.Permutahedron(), sigma=0.5, num_samples=7, mesh=mesh
    )
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(0)

    # Small graphs: skip LLVM's optimisations (halves compile time).
    @partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(theta, y_true):
        ell, grad = jax.value_and_grad(lambda t: loss(t, y_true, key=key).sum())(theta)
        return opt(theta, key=key), opt.max(theta, key=key), ell, grad

    results = {"processes": np.array(processes), "num_devices": jax.device_count()}
    rng = np.random.default_rng(0)  # the same data in every process
    # "replicated": 3 instances, 21 solves padded to 24. "sharded": the batch axis is
    # already split over the devices of both processes (a NamedSharding over it).
    for name, batch, spec in (("replicated", 3, P()), ("sharded", 4, P("devices"))):
        theta_np = rng.normal(size=(batch, 6))
        y_true_np = np.argsort(np.argsort(-theta_np, axis=1), axis=1).astype(float)
        sharding = NamedSharding(mesh, spec)
        theta, y_true = (
            jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx])
            for a in (theta_np, y_true_np)
        )
        outs = run(theta, y_true)
        for label, x in zip(("y", "f", "loss", "grad"), outs):
            results[f"{name}_{label}"] = multihost_utils.process_allgather(x, tiled=True)
        results[f"{name}_theta"] = theta_np
        results[f"{name}_y_true"] = y_true_np
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    port, process_id, num_processes = (int(a) for a in sys.argv[1:4])
    main(port, process_id, num_processes, sys.argv[4])
