"""Top-k selection from features, trained through the perturbed layer.

Each instance offers `n` items with feature vectors and hidden values; the decision
is to pick `k` of them. A small equinox MLP scores the items, `sp.TopK(k)` selects the
`k` best scores, and we train *decision-focused*: the loss is minus the hidden value
of the perturbed selection, $-\\langle y_\\varepsilon(\\theta), v\\rangle$, so the
gradient flows through the perturbed layer itself (its Jacobian estimator, with
antithetic Gaussian noise) rather than through a Fenchel-Young loss. No target
selections are needed, only the values observed in the training data.

Metric: the normalised regret on test instances, (best value - value of the predicted
selection) / best value, and the precision@k (the fraction of the true top k picked).

Run it with

    python examples/topk.py            # full settings, minutes on a CPU
    python examples/topk.py --quick    # small settings, what the tests run

It prints progress and saves `topk.png` (regret curve and one test instance) in
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

import structpert as sp


def make_data(num_instances, num_items, num_features, seed):
    """Features x (N, n, d) and hidden positive item values v (N, n)."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(4321).normal(size=num_features) / np.sqrt(num_features)
    x = rng.normal(size=(num_instances, num_items, num_features))
    logits = x @ w + 0.3 * x[..., 1] * x[..., 2]
    values = np.exp(logits) * rng.uniform(0.8, 1.2, size=logits.shape)
    return jnp.asarray(x, jnp.float32), jnp.asarray(values, jnp.float32)


class Scorer(eqx.Module):
    """An MLP applied to each item: features (n, d) -> scores (n,)."""

    mlp: eqx.nn.MLP

    def __init__(self, num_features, key):
        self.mlp = eqx.nn.MLP(num_features, "scalar", 32, 2, key=key)

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def metrics(model, solver, x, values):
    """Normalised regret and precision@k of the unperturbed top-k of the scores."""
    chosen = jax.vmap(solver.argmax)(jax.vmap(model)(x))
    best = jax.vmap(solver.argmax)(values)
    best_value = jnp.sum(best * values, axis=-1)
    regret = jnp.sum(best_value - jnp.sum(chosen * values, axis=-1)) / jnp.sum(best_value)
    precision = jnp.mean(jnp.sum(chosen * best, axis=-1) / solver.k)
    return regret, precision


def main(quick: bool = False, outdir: str = "examples/out") -> dict:
    num_items, k, num_features = 20, 5, 8
    num_train, num_test = (300, 300) if quick else (2000, 1000)
    steps = 150 if quick else 1500
    batch_size = 32
    x_train, v_train = make_data(num_train, num_items, num_features, seed=0)
    x_test, v_test = make_data(num_test, num_items, num_features, seed=1)

    key, init_key = jax.random.split(jax.random.key(0))
    model = Scorer(num_features, init_key)
    solver = sp.TopK(k)
    layer = sp.PerturbedOptimizer(
        solver, noise=sp.Normal(), sigma=0.5, num_samples=16, antithetic=True
    )
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, v, key):
        def batch_loss(model):
            y_eps = layer(jax.vmap(model)(x), key=key)  # (batch, n), soft selections
            return -jnp.mean(jnp.sum(y_eps * v, axis=-1))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    evaluate = eqx.filter_jit(metrics)
    regret, precision = map(float, evaluate(model, solver, x_test, v_test))
    initial_regret = regret
    history = [(0, regret, precision)]
    print(f"initial test regret {regret:.3f}  precision@{k} {precision:.3f}")
    rng = np.random.default_rng(0)
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, batch_size, replace=False)
        key, subkey = jax.random.split(key)
        model, opt_state, _ = step(model, opt_state, x_train[idx], v_train[idx], subkey)
        if i % (steps // 10) == 0:
            regret, precision = map(float, evaluate(model, solver, x_test, v_test))
            history.append((i, regret, precision))
            print(f"step {i:5d}  test regret {regret:.3f}  precision@{k} {precision:.3f}")

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    steps_seen, regrets, precisions = zip(*history)
    ax1.plot(steps_seen, regrets, marker="o", label="normalised regret")
    ax1.plot(steps_seen, precisions, marker="s", label=f"precision@{k}")
    ax1.set(xlabel="step", ylim=(0, 1))
    ax1.legend()
    theta = model(x_test[0])
    order = np.argsort(-np.asarray(v_test[0]))
    chosen = np.asarray(solver.argmax(theta))[order]
    ax2.bar(
        range(num_items),
        np.asarray(v_test[0])[order],
        color=["tab:green" if c else "tab:gray" for c in chosen],
    )
    ax2.set(
        xlabel="items, by true value",
        ylabel="value",
        title=f"test instance 0: predicted top {k} in green",
    )
    fig.tight_layout()
    fig.savefig(out / "topk.png", dpi=100)
    plt.close(fig)
    return {
        "initial_test_regret": initial_regret,
        "final_test_regret": history[-1][1],
        "initial_precision": history[0][2],
        "final_precision": history[-1][2],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
