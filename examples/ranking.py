"""Learn to rank items from their features with a Fenchel-Young loss.

Each instance is a list of `n` items described by feature vectors; the target is the
ranking of their (hidden) scores. A small equinox MLP maps each item's features to a
score $\\theta_i$, and the perturbed Fenchel-Young loss on the permutahedron compares
the ranking of the scores with the target ranking. The loss needs one solver pass (a
sort) per perturbed sample and no Jacobian estimate: its gradient is
$y_\\varepsilon(\\theta) - y$.

Metric: the test error is the Hamming distance between predicted and true rankings,
the fraction of items put at a wrong rank (as in InferOpt's ranking tests, whose pass
bar is a final error below 0.75 times the initial one).

Run it with

    python examples/ranking.py            # full settings, minutes on a CPU
    python examples/ranking.py --quick    # small settings, what the tests run

It prints progress and saves `ranking.png` (loss and test error curves) in `--outdir`.
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
    """Features x (N, n, d) and target ranks (N, n) of hidden noisy scores."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1234).normal(size=num_features)  # the hidden scorer
    x = rng.normal(size=(num_instances, num_items, num_features))
    scores = (
        x @ w + 0.5 * np.sin(2 * x[..., 0]) + 0.05 * rng.normal(size=(num_instances, num_items))
    )
    ranks = np.argsort(np.argsort(scores, axis=-1), axis=-1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(ranks, jnp.float32)


class Scorer(eqx.Module):
    """An MLP applied to each item: features (n, d) -> scores (n,)."""

    mlp: eqx.nn.MLP

    def __init__(self, num_features, key):
        self.mlp = eqx.nn.MLP(num_features, "scalar", 16, 1, key=key)

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)


def test_error(model, x, ranks):
    """Mean fraction of items whose predicted rank is wrong (Hamming distance / n)."""
    theta = jax.vmap(model)(x)
    predicted = jax.vmap(sp.Permutahedron().argmax)(theta)
    return jnp.mean(predicted != ranks)


def main(quick: bool = False, outdir: str = "examples/out") -> dict:
    num_items, num_features = 10, 5
    num_train, num_test = (200, 200) if quick else (1000, 500)
    steps = 150 if quick else 1000
    batch_size = 32
    x_train, y_train = make_data(num_train, num_items, num_features, seed=0)
    x_test, y_test = make_data(num_test, num_items, num_features, seed=1)

    key, init_key = jax.random.split(jax.random.key(0))
    model = Scorer(num_features, init_key)
    optimizer = sp.PerturbedOptimizer(
        sp.Permutahedron(), noise=sp.Normal(), sigma=0.1, num_samples=10
    )
    loss_fn = sp.FenchelYoungLoss(optimizer)
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y, key):
        def batch_loss(model):
            theta = jax.vmap(model)(x)  # (batch, n): one score per item
            return jnp.mean(loss_fn(theta, y, key=key))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    evaluate = eqx.filter_jit(test_error)
    initial_error = float(evaluate(model, x_test, y_test))
    print(f"initial test error: {initial_error:.3f}")
    losses, errors = [], [(0, initial_error)]
    rng = np.random.default_rng(0)
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, batch_size, replace=False)
        key, subkey = jax.random.split(key)
        model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx], subkey)
        losses.append(float(loss))
        if i % (steps // 10) == 0:
            errors.append((i, float(evaluate(model, x_test, y_test))))
            print(f"step {i:5d}  loss {np.mean(losses[-20:]):8.4f}  test error {errors[-1][1]:.3f}")
    final_error = errors[-1][1]
    ratio = final_error / initial_error
    print(f"final test error: {final_error:.3f} ({ratio:.2f}x the initial one)")

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(losses)
    ax1.set(xlabel="step", ylabel="Fenchel-Young loss (train batch)")
    ax2.plot(*zip(*errors), marker="o")
    ax2.set(xlabel="step", ylabel="test error (fraction of wrong ranks)", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out / "ranking.png", dpi=100)
    plt.close(fig)
    return {
        "initial_test_error": initial_error,
        "final_test_error": final_error,
        "losses": losses,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
