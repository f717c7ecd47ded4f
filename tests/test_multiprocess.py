"""Two CPU processes on localhost, one JAX runtime: the sharded layer under
`jax.distributed.initialize` gives the single-process result (issue: beyond one machine).
"""

import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import structpert as sp


WORKER = Path(__file__).with_name("_multiprocess_worker.py")
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120  # a bound, not an expectation: the run takes about 10-30 s


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp_path) -> list[dict]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("PYTEST_ADDOPTS", None)
    port = _free_loopback_port()
    outs = [tmp_path / f"process{i}.npz" for i in range(NUM_PROCESSES)]
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(NUM_PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(NUM_PROCESSES), str(out)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for i, (out, log) in enumerate(zip(outs, logs))
    ]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for i, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- process {i} (exit {procs[i].returncode}) ---\n{log.read()[-3000:]}")
        log.close()
    if any(p.returncode != 0 for p in procs):
        pytest.fail("a worker failed or timed out:\n" + "\n".join(text))
    return [dict(np.load(out)) for out in outs]


def test_two_processes_match_one_process(tmp_path):
    results = _run_workers(tmp_path)
    # The same computation in this one process, without a mesh.
    opt = sp.PerturbedOptimizer(sp.Permutahedron(), sigma=0.5, num_samples=7)
    loss = sp.FenchelYoungLoss(opt)
    key = jax.random.key(0)

    @partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(theta, y_true):
        ell, grad = jax.value_and_grad(lambda t: loss(t, y_true, key=key).sum())(theta)
        return dict(y=opt(theta, key=key), f=opt.max(theta, key=key), loss=ell,
                    grad=grad)

    first = results[0]
    for res in results:
        # The mesh really spans both processes, with every device of each.
        np.testing.assert_array_equal(res["processes"], np.arange(NUM_PROCESSES))
        assert int(res["num_devices"]) == NUM_PROCESSES * DEVICES_PER_PROCESS
        # Both processes hold the same gathered result.
        for k in first:
            np.testing.assert_array_equal(res[k], first[k], err_msg=k)
    for name in ("replicated", "sharded"):
        want = run(jnp.asarray(first[f"{name}_theta"]), jnp.asarray(first[f"{name}_y_true"]))
        for label, value in want.items():
            np.testing.assert_allclose(first[f"{name}_{label}"], value, rtol=1e-12,
                                       atol=1e-12, err_msg=f"{name} {label}")
