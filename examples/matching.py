"""Learn to match from features with a perturbed Fenchel-Young loss.

Each instance assigns `n` items to `n` slots. Every (item, slot) pair has a feature
vector; the hidden compatibility of a pair is a fixed nonlinear function of its
features, and the target is the maximum-weight matching of those compatibilities.
A small Equinox MLP maps the (noisy) pair features to a score matrix theta, trained
with `sp.FenchelYoungLoss(sp.PerturbedOptimizer(sp.BipartiteMatching(), ...))`: the
loss needs only the solver, never a gradient through it. We report the fraction of
items sent to their correct slot on held-out instances.

Run it with:

    python examples/matching.py            # full run, a few minutes on a laptop CPU
    python examples/matching.py --quick    # the smoke test, seconds
"""

import argparse
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

import structpert as sp


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def make_data(w1, key, num, n, noise):
    """Noisy pair features (num, n, n, dim) and the true matchings (num, n, n)."""
    dim = w1.shape[0]
    k_x, k_e = jax.random.split(key)
    features = jax.random.normal(k_x, (num, n, n, dim))
    hidden = jnp.sum(jnp.tanh(features @ w1) * features, axis=-1)  # (num, n, n)
    noisy = features + noise * jax.random.normal(k_e, features.shape)
    targets = sp.BipartiteMatching().argmax_batch(hidden)
    return noisy, targets


class PairScorer(eqx.Module):
    """theta[i, j] = MLP(features[i, j]): one score per (item, slot) pair."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, key):
        self.mlp = eqx.nn.MLP(dim, "scalar", width_size=32, depth=2, key=key)

    def __call__(self, features):  # (..., n, n, dim) -> (..., n, n)
        flat = features.reshape(-1, features.shape[-1])
        return jax.vmap(self.mlp)(flat).reshape(features.shape[:-1])


def accuracy(model, features, targets):
    """Fraction of items matched to their true slot by the predicted matching."""
    pred = sp.BipartiteMatching().argmax_batch(model(features))
    return jnp.mean(jnp.sum(pred * targets, axis=-1))


def main(quick: bool = False, outdir: str = "examples/out"):
    n, dim = 6, 8
    num_train, num_test = (256, 128) if quick else (2048, 1024)
    steps = 120 if quick else 1500
    batch, every = 32, (20 if quick else 100)

    key = jax.random.key(0)
    k_w, k_train, k_test, k_model, key = jax.random.split(key, 5)
    w1 = jax.random.normal(k_w, (dim, dim)) / jnp.sqrt(dim)  # the hidden function
    x_train, y_train = make_data(w1, k_train, num_train, n, noise=0.3)
    x_test, y_test = make_data(w1, k_test, num_test, n, noise=0.3)

    solver = sp.BipartiteMatching()
    layer = sp.PerturbedOptimizer(solver, noise=sp.Normal(), sigma=1.0, num_samples=8)
    loss_fn = sp.FenchelYoungLoss(layer)
    model = PairScorer(dim, k_model)
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y, key):
        def loss(m):
            return jnp.mean(loss_fn(m(x), y, key=key))

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, opt_state = optim.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, value

    eval_acc = eqx.filter_jit(accuracy)
    steps_log, accs, losses = [], [], []
    start = time.perf_counter()
    acc0 = float(eval_acc(model, x_test, y_test))
    steps_log.append(0)
    accs.append(acc0)
    print(f"solver method: {solver.resolved_method(n)}")
    print(f"step     0  test accuracy {acc0:.3f}")
    running = []
    for step in range(1, steps + 1):
        key, k_batch, k_noise = jax.random.split(key, 3)
        idx = jax.random.choice(k_batch, num_train, (batch,), replace=False)
        model, opt_state, value = train_step(model, opt_state, x_train[idx], y_train[idx], k_noise)
        running.append(float(value))
        if step % every == 0 or step == steps:
            acc = float(eval_acc(model, x_test, y_test))
            steps_log.append(step)
            accs.append(acc)
            losses.append(float(np.mean(running)))
            running = []
            print(
                f"step {step:5d}  loss {losses[-1]:8.4f}  test accuracy {acc:.3f}  "
                f"({time.perf_counter() - start:.1f}s)"
            )

    os.makedirs(outdir, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(steps_log, accs, marker="o")
    ax1.set_xlabel("training step")
    ax1.set_ylabel("items matched to the true slot")
    ax1.set_ylim(0, 1)
    ax1.set_title(f"held-out accuracy ({n} items to {n} slots)")
    ax2.plot(steps_log[1:], losses, marker="o")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("Fenchel-Young loss (train)")
    ax2.set_title("training loss")
    fig.tight_layout()
    plot = os.path.join(outdir, "matching.png")
    fig.savefig(plot, dpi=120)
    plt.close(fig)
    print(f"saved {plot}")
    return {
        "initial_accuracy": acc0,
        "final_accuracy": accs[-1],
        "accuracies": accs,
        "losses": losses,
        "plot": plot,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--outdir", default="examples/out")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
