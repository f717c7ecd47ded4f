"""Shortest paths on Warcraft-like maps: an equinox CNN learns terrain costs from images.

The Warcraft benchmark (Vlastelica et al. 2020; Berthet et al. 2020) shows a network a
map image and asks for the cheapest path from the top-left to the bottom-right cell;
the only supervision is the optimal path. The original images cannot be downloaded
here, so this script renders its own: `structpert.datasets.warcraft_maps` draws cost
maps of a few terrain types, and each cell becomes a small noisy patch of the colour
of its terrain. A small CNN maps an image to one positive cost per cell,
`sp.GridShortestPath()` finds the path (8-neighbour moves, both end cells counted),
and the perturbed Fenchel-Young loss compares it with the true path. The noise is
additive and Gaussian; the few perturbed costs that turn negative count as zero for
the solver. (Multiplicative noise keeps costs positive, but it makes the
Fenchel-Young loss proportional to the scale of the costs, and long runs then learn
to shrink most costs instead of ranking them; see the docs on perturbations.)

Metrics on test maps: the ratio of the true cost of the predicted path to the optimal
cost (1 is perfect; `structpert.metrics.cost_ratio`) and the fraction of paths found
exactly (`structpert.metrics.exact_match`).

Run it with

    python examples/warcraft.py            # full settings, minutes on a CPU
    python examples/warcraft.py --quick    # small settings, what the tests run

It prints progress and saves `warcraft.png` (metric curves and one test map with its
true and predicted paths) in `--outdir`.
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
from structpert import datasets, metrics


# One colour per terrain type, cheapest first (grass, sand, forest, water, mountain).
COLOURS = np.array(
    [[0.45, 0.75, 0.35], [0.85, 0.8, 0.5], [0.15, 0.45, 0.2], [0.2, 0.4, 0.8], [0.5, 0.45, 0.4]]
)
PIXELS = 4  # each cell is a PIXELS x PIXELS patch of the image


def render(costs, seed):
    """Cost maps (N, H, W) -> images (N, 3, H * PIXELS, W * PIXELS) with pixel noise."""
    levels = np.asarray(datasets.WARCRAFT_COSTS)
    kinds = np.argmin(np.abs(costs[..., None] - levels), axis=-1)  # terrain type
    images = COLOURS[kinds]  # (N, H, W, 3)
    images = images.repeat(PIXELS, axis=1).repeat(PIXELS, axis=2)
    images += np.random.default_rng(seed).normal(scale=0.15, size=images.shape)
    return np.transpose(images, (0, 3, 1, 2)).astype(np.float32)


def make_data(num_maps, grid, seed):
    costs = datasets.warcraft_maps(num_maps, grid, seed=seed)
    images = render(costs, seed + 1)
    paths = jax.jit(sp.GridShortestPath().argmax_batch)(-jnp.asarray(costs))
    return jnp.asarray(images), jnp.asarray(costs), paths


class CostCNN(eqx.Module):
    """Image (3, H*P, W*P) -> positive cost per cell (H, W)."""

    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Conv2d

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(3, 16, kernel_size=3, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(16, 16, kernel_size=3, padding=1, key=k2)
        self.head = eqx.nn.Conv2d(16, 1, kernel_size=1, key=k3)

    def __call__(self, image):
        h = jax.nn.relu(self.conv1(image))
        h = eqx.nn.MaxPool2d(2, 2)(h)  # cells of P x P pixels -> P/2 x P/2
        h = jax.nn.relu(self.conv2(h))
        h = eqx.nn.AvgPool2d(PIXELS // 2, PIXELS // 2)(h)  # one value per cell
        return jax.nn.softplus(self.head(h)[0])  # positive costs (H, W)


def predict(model, images):
    """The paths the model chooses: shortest paths for its predicted costs."""
    return sp.GridShortestPath().argmax_batch(-jax.vmap(model)(images))


def evaluate(model, images, costs, paths):
    predicted = predict(model, images)
    ratio = metrics.cost_ratio(costs, predicted, paths)
    return ratio, metrics.exact_match(predicted, paths), predicted


def main(quick: bool = False, outdir: str = "examples/out") -> dict:
    grid = (12, 12)
    num_train, num_test = (160, 100) if quick else (2000, 500)
    steps = 60 if quick else 1500
    batch_size, num_samples = 16, 8
    images, costs, paths = make_data(num_train + num_test, grid, seed=0)
    x_train, y_train = images[:num_train], paths[:num_train]
    x_test, c_test, y_test = images[num_train:], costs[num_train:], paths[num_train:]

    layer = sp.PerturbedOptimizer(
        sp.GridShortestPath(),
        noise=sp.Normal(),
        sigma=1.0,
        num_samples=num_samples,
    )
    loss_fn = sp.FenchelYoungLoss(layer)
    key, init_key = jax.random.split(jax.random.key(0))
    model = CostCNN(init_key)
    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, images, paths, key):
        def batch_loss(model):
            theta = -jax.vmap(model)(images)  # minus costs, (batch, H, W)
            return jnp.mean(loss_fn(theta, paths, key=key))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    score = eqx.filter_jit(evaluate)
    ratio, exact, predicted = score(model, x_test, c_test, y_test)
    history = [(0, float(ratio), float(exact))]
    ratio, exact = history[0][1:]
    print(f"initial test cost ratio {ratio:.3f}  exact paths {exact:.3f}")
    rng = np.random.default_rng(0)
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, batch_size, replace=False)
        key, subkey = jax.random.split(key)
        model, opt_state, loss = step(model, opt_state, x_train[idx], y_train[idx], subkey)
        if i % (steps // 10) == 0:
            ratio, exact, predicted = score(model, x_test, c_test, y_test)
            ratio, exact = float(ratio), float(exact)
            history.append((i, ratio, exact))
            print(
                f"step {i:5d}  loss {float(loss):7.3f}  test cost ratio {ratio:.3f}  "
                f"exact paths {exact:.3f}"
            )

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    steps_seen, ratios, exacts = zip(*history)
    axes[0].plot(steps_seen, ratios, marker="o", label="cost ratio (1 is optimal)")
    axes[0].plot(steps_seen, exacts, marker="s", label="exact paths")
    axes[0].set(xlabel="step")
    axes[0].legend()
    image = np.clip(np.transpose(np.asarray(x_test[0]), (1, 2, 0)), 0, 1)
    predicted = np.asarray(predicted[0])  # test map 0, from the last evaluation
    for ax, path, title in (
        (axes[1], y_test[0], "true path"),
        (axes[2], predicted, "predicted path"),
    ):
        ax.imshow(image)
        rows, cols = np.nonzero(np.asarray(path))
        ax.scatter((cols + 0.5) * PIXELS - 0.5, (rows + 0.5) * PIXELS - 0.5, color="red", s=12)
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(out / "warcraft.png", dpi=100)
    plt.close(fig)
    return {
        "initial_test_cost_ratio": history[0][1],
        "final_test_cost_ratio": history[-1][1],
        "initial_exact_match": history[0][2],
        "final_exact_match": history[-1][2],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
