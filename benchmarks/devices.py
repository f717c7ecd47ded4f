"""Throughput of a sharded perturbed layer on 1, 2 and 4 devices.

    python benchmarks/devices.py                       # ranking and grid paths, 1/2/4 devices
    python benchmarks/devices.py --quick               # small sizes, a smoke run
    python benchmarks/devices.py --separate-processes  # one process per device count
    JAX_PLATFORMS=cuda,cpu python benchmarks/devices.py --devices 1   # on one GPU

Without `JAX_PLATFORMS` set, the script runs on the CPU even where a GPU is present;
on GPUs list `cpu` too (the host-callback workload needs it). On CPU the devices are
host devices made with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (set by this script). By default
one process gets the largest N and times meshes over its first 1, 2, ... devices in
interleaved rounds (1, 2, 4, 1, 2, 4, ...), so a burst of load from other programs
hits every device count alike; `--separate-processes` runs each count in its own
process with exactly N devices instead. On a machine with C cores, N host devices can
use at most C of them.

The workload is solver-bound: one training step (value and gradient of the
Fenchel-Young loss: one solver pass) over `batch x num_samples` perturbed instances,
with `PerturbedOptimizer(..., mesh=mesh)`, for three solvers: ranking
(`Permutahedron`), grid shortest paths (`GridShortestPath`) and ranking by NumPy on the
host (`HostSolver`). Note that on CPU, XLA already spreads one device's sort or
relaxation over its own thread pool, while a host callback runs on one thread per
device: the last workload shows what splitting over devices adds when the solver
itself is single-threaded. Every device count must give the one-device
loss and gradient for the same key; the script checks it. No peer library spreads
perturbed solver calls over devices, so the ratios are against one device.

Timings are minima over rounds. Because the machine may be shared, the script also
measures how much CPU two busy processes get compared with one at that moment (the
speed-up the machine can offer right now, 2.0 on two idle cores), and how many cores
each configuration kept busy.
"""

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time


WORKLOADS = {
    # name: (solver, event shape, batch, num_samples, perturbation)
    "ranking": ("Permutahedron", (2000,), 64, 32, "additive"),
    "grid": ("GridShortestPath", (48, 48), 64, 16, "multiplicative"),
    "host-rank": ("HostSolver", (2000,), 64, 32, "additive"),  # NumPy via callback
}
QUICK = {
    "ranking": ("Permutahedron", (200,), 8, 8, "additive"),
    "grid": ("GridShortestPath", (8, 8), 4, 4, "multiplicative"),
    "host-rank": ("HostSolver", (200,), 8, 8, "additive"),
}


def numpy_ranks(thetas):
    """Ranks of each row by NumPy (stable double argsort), for sp.HostSolver."""
    import numpy as np

    order = np.argsort(thetas, axis=-1, kind="stable")
    return np.argsort(order, axis=-1, kind="stable")


def make_solver(sp, name: str):
    if name == "HostSolver":
        return sp.HostSolver(fn=numpy_ranks, event_ndim=1, batched=True)
    return getattr(sp, name)()


def _set_host_devices(n: int) -> None:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def _thread_ticks() -> dict:
    """CPU clock ticks used so far by each thread of this process (Linux; else {})."""
    ticks = {}
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return {}
    return ticks


def _busy_threads(before: dict, after: dict) -> int:
    """Threads that did at least 20% of the busiest thread's work in between."""
    work = [after[t] - before.get(t, 0) for t in after]
    top = max(work, default=0)
    return sum(w >= 0.2 * top for w in work) if top > 0 else 0


def measure(device_counts, workloads: dict, rounds: int) -> dict:
    """Time each workload on meshes over the first n devices, n in `device_counts`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import structpert as sp

    devices = jax.devices()
    if len(devices) < max(device_counts):
        raise SystemExit(f"need {max(device_counts)} devices, JAX sees {len(devices)}")
    out = {"platform": devices[0].platform}
    for name, (solver_name, event, batch, samples, perturbation) in workloads.items():
        if not hasattr(sp, solver_name):
            continue
        theta = -jax.random.uniform(jax.random.key(1), (batch, *event), jnp.float32,
                                    minval=0.1, maxval=1.0)
        y_true = jax.random.bernoulli(jax.random.key(2), 0.5, theta.shape).astype(
            jnp.float32
        )
        counts = device_counts
        if solver_name == "HostSolver" and out["platform"] == "cpu":
            # Host callbacks on more CPU devices than cores can deadlock in XLA's CPU
            # runtime (the layer warns); they would not run faster there anyway.
            from structpert._sharding import _num_cores  # the layer's own count

            counts = tuple(n for n in device_counts if n <= _num_cores())
            if counts != tuple(device_counts):
                print(f"{name}: skipping {sorted(set(device_counts) - set(counts))} "
                      f"devices (more than the {_num_cores()} cores; see the "
                      "multi-device guide)", flush=True)
        steps = {}
        for n in counts:
            mesh = jax.make_mesh((n,), ("devices",), devices=devices[:n])
            opt = sp.PerturbedOptimizer(make_solver(sp, solver_name), noise=sp.Normal(),
                                        sigma=0.5, num_samples=samples,
                                        perturbation=perturbation, mesh=mesh)
            loss = sp.FenchelYoungLoss(opt)
            steps[n] = jax.jit(jax.value_and_grad(
                lambda t, loss=loss: loss(t, y_true, key=jax.random.key(0)).sum()
            ))
        res = {n: {"times": [], "cpu": 0.0, "wall": 0.0, "ticks": {}}
               for n in counts}
        for n, step in steps.items():  # compile, and keep the answer to compare
            ell, grad = jax.block_until_ready(step(theta))
            res[n]["loss"] = float(ell)
            res[n]["grad"] = np.asarray(grad)
        for _ in range(rounds):
            for n, step in steps.items():
                k0, c0, t0 = _thread_ticks(), time.process_time(), time.perf_counter()
                jax.block_until_ready(step(theta))
                c1, t1, k1 = time.process_time(), time.perf_counter(), _thread_ticks()
                for tid, v in k1.items():
                    res[n]["ticks"][tid] = res[n]["ticks"].get(tid, 0) + v - k0.get(tid, 0)
                res[n]["times"].append(t1 - t0)
                res[n]["cpu"] += c1 - c0
                res[n]["wall"] += t1 - t0
        out[name] = {
            str(n): {
                "seconds": min(r["times"]),
                "solves": batch * samples,
                "cores_used": r["cpu"] / r["wall"],
                "busy_threads": _busy_threads({}, r["ticks"]),
                "loss": r["loss"],
                "grad": r["grad"].ravel()[:20000].tolist(),  # enough to compare
            }
            for n, r in res.items()
        }
    return out


def _spin(seconds: float) -> int:
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        count += 1
    return count


def available_speedup(seconds: float = 2.0) -> float:
    """Work done by 2 busy processes / work done by 1, right now (2.0 when idle)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        one = pool.map(_spin, [seconds])[0]
        two = sum(pool.map(_spin, [seconds, seconds]))
    return two / one


def run_separately(device_counts, quick: bool, rounds: int) -> dict:
    merged: dict = {}
    for n in device_counts:
        env = dict(os.environ)
        env.setdefault("JAX_PLATFORMS", "cpu")
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [
            f"--xla_force_host_platform_device_count={n}"])
        cmd = [sys.executable, __file__, "--child", str(n), "--rounds", str(rounds)]
        res = subprocess.run(cmd + (["--quick"] if quick else []), env=env,
                             capture_output=True, text=True, timeout=1800)
        if res.returncode:
            raise RuntimeError(f"{n} devices failed:\n{res.stderr[-3000:]}")
        part = json.loads(res.stdout.strip().splitlines()[-1])
        merged["platform"] = part.pop("platform")
        for name, by_n in part.items():
            merged.setdefault(name, {}).update(by_n)
    return merged


def main(quick: bool = False, devices=(1, 2, 4), rounds: int = 7,
         separate: bool = False) -> dict:
    print(f"cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}; "
          f"minimum over {rounds} rounds", flush=True)
    before = available_speedup()
    if separate:
        results = run_separately(devices, quick, rounds)
    else:
        _set_host_devices(max(devices))
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        results = measure(devices, QUICK if quick else WORKLOADS, rounds)
    after = available_speedup()
    header = (f"{'workload':<9} {'devices':>7} {'solves':>7} {'step s':>8} "
              f"{'solves/s':>9} {'speed-up':>9} {'cores used':>10} {'threads':>7} "
              f"{'grad diff':>10}")
    print(f"\nplatform: {results.pop('platform')}, "
          f"{'one process per device count' if separate else 'one process, sub-meshes'}")
    print(f"{header}\n{'-' * len(header)}")
    ratios = {}
    for name, by_n in results.items():
        base = by_n[str(devices[0])]
        for n in devices:
            if str(n) not in by_n:
                continue
            r = by_n[str(n)]
            speedup = base["seconds"] / r["seconds"]
            ratios[(name, n)] = speedup
            grad_diff = max(abs(a - b) for a, b in zip(r["grad"], base["grad"]))
            print(f"{name:<9} {n:>7} {r['solves']:>7} {r['seconds']:>8.4f} "
                  f"{r['solves'] / r['seconds']:>9.1f} {speedup:>8.2f}x "
                  f"{r['cores_used']:>10.2f} {r['busy_threads']:>7} {grad_diff:>10.1e}")
            if grad_diff > 1e-5 or abs(r["loss"] - base["loss"]) > 1e-4 * (
                1 + abs(base["loss"])
            ):
                raise AssertionError(f"{name}: {n} devices disagree with one device")
    print(
        f"\nspeed-up the machine offered (work of 2 busy processes / 1): "
        f"{before:.2f} before, {after:.2f} after (2.00 on two idle cores)\n"
        "speed-up = step time on one device / on N devices (same key, same answer);\n"
        "cores used = CPU seconds / wall seconds of the process while timing that count;"
        "\nthreads = threads that each did >= 20% of the busiest one's work in those steps"
        "\n  (XLA's own intra-op threads count too; each can use a free core);"
        "\ngrad diff = max |gradient - one-device gradient|"
    )
    return ratios


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--separate-processes", action="store_true")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure((args.child,), QUICK if args.quick else WORKLOADS,
                                 args.rounds)))
    else:
        main(args.quick, tuple(args.devices), args.rounds, args.separate_processes)
