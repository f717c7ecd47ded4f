"""Perturbed optimizers: one-hot argmax and ranking, made differentiable.

The seed notebook of jaxopt ("Perturbed optimizers"), run on structpert. The first
half uses the jaxopt-compatible front end exactly as the notebook does (only the
import differs); the last part shows the same layers with structpert's native API.

Run it:

    python examples/perturbed_optimizers.py            # full settings, as the notebook
    python examples/perturbed_optimizers.py --quick    # fewer samples and steps
"""

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

import structpert as sp
from structpert import perturbations


def argmax_one_hot(x, axis=-1):
    return jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis])


def ranking(values):
    return jnp.argsort(jnp.argsort(values))


def one_hot_part(n_samples, steps):
    print("== Argmax one-hot")
    values = jnp.array([-0.6, 1.9, -0.2, 1.1, -1.0])
    print(argmax_one_hot(values))

    sigma = 0.5
    pert_one_hot = perturbations.make_perturbed_argmax(
        argmax_fun=argmax_one_hot,
        num_samples=n_samples,
        sigma=sigma,
        noise=perturbations.Gumbel(),
    )
    rngs = jax.random.split(jax.random.PRNGKey(1), 2)
    pert_argmax = pert_one_hot(values, rngs[0])
    soft_max = jax.nn.softmax(values / sigma)
    print(f"computation with {n_samples} samples, sigma = {sigma}")
    print(f"perturbed argmax = {pert_argmax}")
    print(f"softmax = {soft_max}")
    print(f"square norm of softmax = {jnp.linalg.norm(soft_max):.2e}")
    print(f"square norm of difference = {jnp.linalg.norm(pert_argmax - soft_max):.2e}")

    n = values.shape[0]
    y_true = (jnp.arange(n) + 2) / jnp.sum(jnp.arange(n) + 2)

    def loss_simplex(values, rng):
        y_pred = pert_one_hot(values, rng)
        return jnp.sum((y_true - y_pred) ** 2)

    print(f"loss = {loss_simplex(values, rngs[1])}")
    print(f"gradient = {jax.grad(loss_simplex)(values, rngs[1])}")

    grad_func = jax.jit(jax.grad(loss_simplex))
    values_t = values
    for _ in range(steps):
        rngs = jax.random.split(rngs[1], 2)
        values_t = values_t - 0.5 * grad_func(values_t, rngs[1])
    rngs = jax.random.split(rngs[1], 2)
    final = pert_one_hot(values_t, rngs[1])
    print(f"values after GD = {values_t}")
    print(f"diff. one-hot after GD = {final}")
    print(f"target diff. one-hot = {y_true}")
    return pert_argmax, soft_max, final, y_true


def ranking_part(n_samples, steps):
    print("== Differentiable ranking")
    n = 6
    rng = jax.random.PRNGKey(0)
    # The notebook draws jax.random.normal(rng, (6,)); jax >= 0.5 changed its random
    # stream, so the notebook's values are written out to keep its starting point.
    values = jnp.array(
        [0.18784384, -1.2833426, 0.6494181, 1.2490593, 0.24447003, -0.11744965]
    )
    print(f"values = {values}")
    print(f"ranking = {ranking(values)}")

    pert_ranking = perturbations.make_perturbed_argmax(
        ranking, num_samples=n_samples, sigma=0.2, noise=perturbations.Gumbel()
    )
    rngs = jax.random.split(rng, 2)
    print(f"diff_ranks = {pert_ranking(values, rngs[0])}")

    y_true = ranking(jnp.arange(n))

    def loss_example(values, rng):
        return jnp.sum((y_true - pert_ranking(values, rng)) ** 2)

    print(f"loss = {loss_example(values, rngs[1])}")
    print(f"gradient = {jax.grad(loss_example)(values, rngs[1])}")

    grad_func = jax.jit(jax.grad(loss_example))
    values_t = values
    history = [ranking(values_t)]
    for _ in range(steps):
        rngs = jax.random.split(rngs[1], 2)
        values_t = values_t - 0.1 * grad_func(values_t, rngs[1])
        history.append(ranking(values_t))
    rngs = jax.random.split(rngs[1], 2)
    print(f"values after GD = {values_t}")
    print(f"ranks after GD = {ranking(values_t)}")
    print(f"diff. ranks after GD = {pert_ranking(values_t, rngs[1])}")
    print(f"target diff. ranks = {y_true}")
    return values_t, np.stack(history)


def native_part():
    print("== The same layers with the native API")
    values = jnp.array([-0.6, 1.9, -0.2, 1.1, -1.0])
    opt = sp.PerturbedOptimizer(
        sp.Simplex(), noise=sp.Gumbel(), sigma=0.5, num_samples=10_000
    )
    key = jax.random.key(0)
    print(f"y_eps = {opt(values, key=key)}")
    print(
        f"F_eps = {opt.max(values, key=key)}  (closed form "
        f"{0.5 * jax.nn.logsumexp(values / 0.5) + 0.5 * np.euler_gamma:.5f})"
    )
    ranker = sp.PerturbedOptimizer(
        sp.Permutahedron(), noise=sp.Gumbel(), sigma=0.2, num_samples=100
    )
    batch = jax.random.normal(jax.random.key(1), (3, 6))
    print(f"soft ranks of a batch of 3:\n{ranker(batch, key=key)}")


def main(quick: bool = False, outdir: str = "examples/out"):
    one_hot = one_hot_part(n_samples=20_000 if quick else 100_000, steps=200)
    values_t, history = ranking_part(n_samples=100, steps=20)
    native_part()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(outdir, exist_ok=True)
    pert_argmax, soft_max, final, y_true = one_hot
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = np.arange(len(soft_max))
    axes[0].bar(x - 0.2, pert_argmax, width=0.4, label="perturbed argmax")
    axes[0].bar(x + 0.2, soft_max, width=0.4, label="softmax(θ/ε)")
    axes[0].set_title("Gumbel-perturbed one-hot = softmax")
    axes[0].legend()
    axes[1].plot(history)
    axes[1].set_xlabel("gradient step")
    axes[1].set_ylabel("rank")
    axes[1].set_title("ranks during gradient descent")
    fig.tight_layout()
    path = os.path.join(outdir, "perturbed_optimizers.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")
    return {
        "pert_argmax": np.asarray(pert_argmax),
        "softmax": np.asarray(soft_max),
        "final_one_hot": np.asarray(final),
        "target_one_hot": np.asarray(y_true),
        "final_ranks": np.asarray(ranking(values_t)),
        "plot": path,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps")
    parser.add_argument(
        "--outdir", default="examples/out", help="where to save the plot"
    )
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
