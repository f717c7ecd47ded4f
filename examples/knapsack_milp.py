"""Predict-then-optimise with a SciPy MILP solver inside a jitted training loop.

A knapsack: choose items of known weights under a capacity to maximise their total
value; the values are unknown and must be predicted from features (the setting of
PyEPO's knapsack benchmark). The solver is `scipy.optimize.milp` (HiGHS), plain
NumPy code, wrapped in `sp.HostSolver`: inside `jax.jit` it runs through
`jax.pure_callback`, **once per training step** on all `batch x num_samples`
perturbed value vectors. A linear model maps features to values and is trained with
the perturbed Fenchel-Young loss against the optimal selections of the true values.

Metric: the normalised regret on test instances, the sum over instances of
(optimal value - true value of the selection made with the predicted values), divided
by the sum of optimal values. The two-stage approach (least-squares values, then the
solver) is reported for reference.

Run it with

    python examples/knapsack_milp.py            # full settings, minutes on a CPU
    python examples/knapsack_milp.py --quick    # small settings, what the tests run

It prints progress and saves `knapsack_milp.png` (loss and regret curves) in
`--outdir`.
"""

import argparse
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
from scipy.optimize import Bounds, LinearConstraint, milp

import structpert as sp


class Knapsack:
    """A host function: the best 0/1 selection of items for values `theta`.

    Maximises <y, theta> subject to <weights, y> <= capacity with `scipy.optimize.milp`.
    It also counts how many times JAX calls it (once per batch, not per instance).
    """

    def __init__(self, weights, capacity):
        self.constraint = LinearConstraint(weights[None, :], -np.inf, capacity)
        self.num_items = len(weights)
        self.host_calls = 0

    def __call__(self, thetas):  # thetas: (N, num_items), the whole batch
        self.host_calls += 1
        ys = np.zeros_like(thetas)
        for i, theta in enumerate(thetas):
            result = milp(
                -theta,  # milp minimises
                constraints=self.constraint,
                integrality=np.ones(self.num_items),
                bounds=Bounds(0, 1),
            )
            if not result.success:
                raise RuntimeError(f"knapsack MILP failed: {result.message}")
            ys[i] = np.round(result.x)
        return ys


def make_data(num_instances, num_items, num_features, seed, degree=2, noise=0.5):
    """Features (N, p) and positive item values (N, m), polynomial in the features."""
    structure = np.random.default_rng(2024)
    b = structure.binomial(1, 0.5, size=(num_items, num_features))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_instances, num_features))
    values = (x @ b.T / np.sqrt(num_features) + 3) ** degree / 3**degree + 0.5
    values *= rng.uniform(1 - noise, 1 + noise, size=values.shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(values, jnp.float32)


def main(quick: bool = False, outdir: str = "examples/out") -> dict:
    num_items, num_features = 10, 5
    weights = np.random.default_rng(7).integers(3, 9, size=num_items).astype(float)
    knapsack = Knapsack(weights, capacity=0.4 * weights.sum())
    solver = sp.HostSolver(knapsack, event_ndim=1, batched=True)

    num_train, num_test = (100, 50) if quick else (1000, 500)
    steps, batch_size, num_samples = (24, 8, 4) if quick else (200, 16, 4)
    num_evaluations = 3 if quick else 5
    x_train, v_train = make_data(num_train, num_items, num_features, seed=0)
    x_test, v_test = make_data(num_test, num_items, num_features, seed=1)
    # Targets: the optimal selections for the true values, in one host call.
    y_train = jax.jit(solver.argmax_batch)(v_train)
    best_test = jax.jit(solver.argmax_batch)(v_test)

    loss_fn = sp.FenchelYoungLoss(
        sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=0.5, num_samples=num_samples)
    )
    key, init_key = jax.random.split(jax.random.key(0))
    model = eqx.nn.Linear(num_features, num_items, key=init_key)
    optim = optax.adam(0.05)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y, key):
        def batch_loss(model):
            return jnp.mean(loss_fn(jax.vmap(model)(x), y, key=key))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    @jax.jit
    def regret_of(values):  # values predicted for the test instances
        chosen = solver.argmax_batch(values)  # one host call for the whole test set
        best = jnp.sum(best_test * v_test)
        return (best - jnp.sum(chosen * v_test)) / best

    def regret(model):
        return regret_of(jax.vmap(model)(x_test))

    initial_regret = float(regret(model))
    print(f"initial test regret {initial_regret:.3f}")
    history, losses = [(0, initial_regret)], []
    rng = np.random.default_rng(0)
    calls_before = knapsack.host_calls
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, batch_size, replace=False)
        key, subkey = jax.random.split(key)
        model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx], subkey)
        losses.append(float(loss))
        if i % (steps // num_evaluations) == 0:
            history.append((i, float(regret(model))))
            print(
                f"step {i:4d}  loss {np.mean(losses[-10:]):.4f}  test regret {history[-1][1]:.3f}"
            )
    evaluations = len(history) - 1
    calls_per_step = (knapsack.host_calls - calls_before - evaluations) / steps
    print(
        f"host calls per training step: {calls_per_step:g} "
        f"(each solving {batch_size} x {num_samples} knapsacks)"
    )

    # For reference, the two-stage approach: fit the values by least squares, then solve.
    features = np.c_[np.asarray(x_train), np.ones(num_train)]
    coef, *_ = np.linalg.lstsq(features, np.asarray(v_train), rcond=None)
    v_hat = np.c_[np.asarray(x_test), np.ones(num_test)] @ coef
    two_stage = float(regret_of(jnp.asarray(v_hat, jnp.float32)))
    print(f"two-stage least squares: test regret {two_stage:.3f}")

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(losses)
    ax1.set(xlabel="step", ylabel="Fenchel-Young loss (train batch)")
    ax2.plot(*zip(*history), marker="o")
    ax2.set(xlabel="step", ylabel="normalised test regret", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(out / "knapsack_milp.png", dpi=100)
    plt.close(fig)
    return {
        "initial_test_regret": initial_regret,
        "final_test_regret": history[-1][1],
        "host_calls_per_step": calls_per_step,
        "two_stage_test_regret": two_stage,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
