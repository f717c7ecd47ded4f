"""Throughput of BipartiteMatching against SciPy and optax, side by side.

For each size n, M perturbed copies of one n x n score matrix (what the perturbed
layer hands to its solver) are solved by:

- `sp.BipartiteMatching(method="jax")`: the pure-JAX batched kernel, jitted;
- `sp.BipartiteMatching(method="scipy")`: one `jax.pure_callback` for the stack;
- `scipy.optimize.linear_sum_assignment` in a Python loop (float64);
- `jax.vmap(optax.assignment.hungarian_algorithm)`, jitted.

Same instances for all; the optimal values are checked to agree. Times are the
minimum over several repeats of the wall-clock time and of the process CPU time
(all threads; on a shared, oversubscribed machine it is the steadier of the two),
and the ratios are peer time / our time (above 1: we are faster).

Run it with:

    python benchmarks/matching.py                 # n = 10, 50, 100; M = 200
    python benchmarks/matching.py --quick         # smaller, fewer repeats
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

import structpert as sp


def best_time(fn, repeats):
    """(min wall-clock time, min CPU time of the process) over `repeats` calls."""
    fn()  # warm up (compilation)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(wall), min(cpu)


def run(n, num_samples, repeats, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, n))
    stack = (base + 0.5 * rng.standard_normal((num_samples, n, n))).astype(np.float32)
    stack64 = stack.astype(np.float64)
    thetas = jnp.asarray(stack)

    ours_jax = jax.jit(sp.BipartiteMatching(method="jax").argmax_batch)
    ours_scipy = jax.jit(sp.BipartiteMatching(method="scipy").argmax_batch)
    hungarian = jax.jit(jax.vmap(optax.assignment.hungarian_algorithm))

    def scipy_loop():
        return [linear_sum_assignment(t, maximize=True) for t in stack64]

    # Same optimum everywhere (values in float64 from each method's matching).
    ref = np.array([t[r, c].sum() for t, (r, c) in zip(stack64, scipy_loop())])
    values = {}
    for name, fn in (("jax", ours_jax), ("scipy-callback", ours_scipy)):
        y = np.asarray(fn(thetas))
        values[name] = np.sum(stack64 * y, axis=(1, 2))
    rows, cols = hungarian(-thetas)
    rows, cols = np.asarray(rows), np.asarray(cols)
    values["optax"] = np.array(
        [t[r, c].sum() for t, r, c in zip(stack64, rows, cols)]
    )
    tol = 1e-4 * n * np.abs(stack64).max()
    for name, v in values.items():
        err = np.abs(v - ref).max()
        assert err <= tol, f"{name}: optimum differs from scipy by {err}"

    times = {
        "jax": best_time(lambda: jax.block_until_ready(ours_jax(thetas)), repeats),
        "scipy-callback": best_time(
            lambda: jax.block_until_ready(ours_scipy(thetas)), repeats
        ),
        "scipy loop": best_time(scipy_loop, repeats),
        "optax vmap": best_time(
            lambda: jax.block_until_ready(hungarian(-thetas)), max(1, repeats // 2)
        ),
    }
    return times


def main(quick: bool = False, sizes=(10, 50, 100), num_samples=200, repeats=7):
    if quick:
        sizes, num_samples, repeats = (10, 20), 50, 3
    print(f"backend: {jax.default_backend()}; M = {num_samples} instances per call; "
          f"min of {repeats} repeats")
    auto = sp.BipartiteMatching()
    print("auto method here: " + ", ".join(f"n={n}: {auto.resolved_method(n)}" for n in sizes))
    header = (f"{'n':>4} {'clock':>5} {'ours jax':>10} {'ours cb':>10} "
              f"{'scipy loop':>11} {'optax':>10} | {'scipy/jax':>9} {'optax/jax':>9} "
              f"{'scipy/cb':>8} {'optax/cb':>8}")
    print(header)
    results = {}
    for n in sizes:
        times = run(n, num_samples, repeats)
        results[n] = times
        for k, clock in enumerate(("wall", "cpu")):
            t = {name: pair[k] for name, pair in times.items()}
            print(
                f"{n:4d} {clock:>5} {t['jax'] * 1e3:8.2f}ms "
                f"{t['scipy-callback'] * 1e3:8.2f}ms "
                f"{t['scipy loop'] * 1e3:9.2f}ms {t['optax vmap'] * 1e3:8.2f}ms | "
                f"{t['scipy loop'] / t['jax']:9.2f} {t['optax vmap'] / t['jax']:9.2f} "
                f"{t['scipy loop'] / t['scipy-callback']:8.2f} "
                f"{t['optax vmap'] / t['scipy-callback']:8.2f}"
            )
    print("ratios: peer time / our time (above 1 = ours faster); optima checked equal")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100])
    args = parser.parse_args()
    main(args.quick, tuple(args.sizes), args.samples, args.repeats)
