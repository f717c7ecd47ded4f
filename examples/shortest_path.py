"""Predict-then-optimise shortest paths on PyEPO's synthetic 5x5 grid.

The setting of PyEPO's notebook "03 Training and Testing": 2000 samples from
`genData(2000, 5, (5, 5), deg=4, noise_width=0.5, seed)` (reproduced exactly by
`structpert.datasets.shortest_path_data`), split 1000/1000 as
`train_test_split(test_size=1000, random_state=seed)`. Each sample has 5 features and
the costs of the 40 arcs (right and down) of a 5x5 grid; the decision is the cheapest
path from the top-left to the bottom-right node.

A linear model `eqx.nn.Linear(5, 40)` predicts the costs $\\hat c = Wx + b$; it is
trained end to end with the perturbed Fenchel-Young loss of
`GraphShortestPath` at $\\theta = -\\hat c$ (additive Gaussian noise, $\\varepsilon = 1$,
3 samples, as PyEPO's `perturbedFenchelYoung`; the DAG solver is exact for costs of
any sign, so additive noise is safe here), with optax Adam (lr 1e-2, batch 32,
20 epochs). A whole epoch is one jitted `lax.scan` over the minibatches. The baseline
is two-stage: least-squares linear regression of the costs, then solve.

Metric: normalized regret on the test set (PyEPO's ratio of sums; lower is better).

Run it with

    python examples/shortest_path.py            # deg 4 and deg 6, seeds 42, 0, 1
    python examples/shortest_path.py --quick    # one short run, a few seconds

It prints progress per epoch and saves `shortest_path.png` (learning curve and one
test instance's true and predicted paths) in `--outdir`.
"""

import argparse
import pathlib
import time

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


GRID = (5, 5)
ARCS = datasets.grid_arcs(GRID)
SOLVER = sp.GraphShortestPath(ARCS[:, 0], ARCS[:, 1], source=0, target=GRID[0] * GRID[1] - 1)
# PyEPO's perturbedFenchelYoung(n_samples=3, sigma=1.0): additive Gaussian noise.
LOSS = sp.FenchelYoungLoss(
    sp.PerturbedOptimizer(SOLVER, noise=sp.Normal(), sigma=1.0, num_samples=3)
)


def make_problem(seed: int, deg: int = 4, num_data: int = 2000, test_size: int = 1000):
    """PyEPO's data and split, and the optimal paths of the true costs."""
    x, c = datasets.shortest_path_data(num_data, 5, GRID, deg=deg, noise_width=0.5, seed=seed)
    train, test = datasets.train_test_indices(num_data, test_size, seed)
    x, c = jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32)
    y = solve(c)
    return (x[train], c[train], y[train]), (x[test], c[test], y[test])


@jax.jit
def solve(costs):
    """Optimal paths (n, 40) for costs (n, 40)."""
    return SOLVER.argmax_batch(-costs)


@eqx.filter_jit
def test_regret(model, x, c, y_opt):
    return metrics.normalized_regret(c, solve(jax.vmap(model)(x)), y_opt)


def _batches(rng, n, batch_size):
    """A shuffled epoch (numpy, on the host): indices (num_batches, batch_size) and
    weights. The last batch is padded with weight-0 rows so all batches have one
    shape (PyTorch's DataLoader would give a smaller last batch)."""
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    idx = np.concatenate([rng.permutation(n), np.zeros(pad, np.int64)])
    real = np.arange(num_batches * batch_size) < n
    weights = real.reshape(num_batches, -1) / real.reshape(num_batches, -1).sum(1, keepdims=True)
    return idx.reshape(num_batches, -1), weights.astype(np.float32)


@eqx.filter_jit
def train_epoch(model, opt_state, x, c, idx, weights, seeds, lr: float):
    """One epoch of Adam on the Fenchel-Young loss: one `lax.scan` over the minibatches
    `idx` (compiled once, reused for every epoch and every seed). The target paths are
    solved from the true costs `c` inside the step (one matrix product per minibatch,
    cheaper than keeping them). `seeds` holds one integer per minibatch, turned into
    that minibatch's key inside the scan."""
    optim = optax.adam(lr)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def batch_loss(params, xb, yb, wb, key):
        cost_hat = jax.vmap(eqx.combine(params, static))(xb)
        # maximisation everywhere: theta = -predicted cost
        return jnp.sum(wb * LOSS(-cost_hat, yb, key=key))

    def step(carry, batch):
        params, opt_state = carry
        ib, wb, seed = batch
        key = jax.random.key(seed)
        yb = SOLVER.argmax_batch(-c[ib])  # the optimal paths of the true costs
        loss, grads = jax.value_and_grad(batch_loss)(params, x[ib], yb, wb, key)
        updates, opt_state = optim.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, weights, seeds))
    return eqx.combine(params, static), opt_state, jnp.mean(losses)


def init_linear(rng: np.random.Generator, n_in: int, n_out: int) -> eqx.nn.Linear:
    """`eqx.nn.Linear(n_in, n_out)` with its default initialisation (uniform in
    +-1/sqrt(n_in), as PyTorch's), drawn with numpy: a one-off initialisation then
    compiles nothing (on CPU, compiling JAX's random-number kernels for it takes
    longer than the whole training run)."""
    key = jax.eval_shape(jax.random.key, 0)  # only shapes: nothing is computed
    shapes = eqx.filter_eval_shape(eqx.nn.Linear, n_in, n_out, key=key)
    bound = 1 / np.sqrt(n_in)
    weight = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
    bias = rng.uniform(-bound, bound, (n_out,)).astype(np.float32)
    params = (jnp.asarray(weight), jnp.asarray(bias))
    return eqx.tree_at(lambda m: (m.weight, m.bias), shapes, params)


def train_fy(train, *, seed, epochs=20, batch_size=32, lr=1e-2, on_epoch=None):
    """Train Linear(5, 40) on `train = (x, c, ...)` (features, true costs) with the
    perturbed Fenchel-Young loss; returns the model and the mean training loss of each
    epoch. `on_epoch(i, model, loss)` is called before training (i = 0) and after each
    epoch. One numpy generator drives the initialisation, the shuffling and the
    minibatch keys."""
    x, c = train[0], train[1]
    rng = np.random.default_rng(seed)
    model = init_linear(rng, x.shape[1], c.shape[1])
    # jitted: one small compilation instead of one per array operation
    opt_state = eqx.filter_jit(optax.adam(lr).init)(eqx.filter(model, eqx.is_inexact_array))
    history = []
    if on_epoch is not None:
        on_epoch(0, model, float("nan"))
    for i in range(epochs):
        idx, weights = _batches(rng, x.shape[0], batch_size)
        seeds = rng.integers(0, 2**31 - 1, idx.shape[0], dtype=np.int32)
        model, opt_state, loss = train_epoch(model, opt_state, x, c, idx, weights, seeds, lr)
        history.append(float(loss))
        if on_epoch is not None:
            on_epoch(i + 1, model, history[-1])
    return model, history


def two_stage(train, like):
    """Least-squares linear regression x -> c (with intercept): the predict-then-
    optimise baseline, returned as a Linear layer shaped like `like`."""
    x, c, _ = train
    design = np.hstack([np.asarray(x, np.float64), np.ones((x.shape[0], 1))])
    coef, *_ = np.linalg.lstsq(design, np.asarray(c, np.float64), rcond=None)
    weight = jnp.asarray(coef[:-1].T, like.weight.dtype)
    bias = jnp.asarray(coef[-1], like.bias.dtype)
    return eqx.tree_at(lambda m: (m.weight, m.bias), like, (weight, bias))


def run(
    seed: int,
    deg: int,
    *,
    epochs: int = 20,
    num_data: int = 2000,
    test_size: int = 1000,
    verbose: bool = True,
):
    """One seed: the data, the FY-trained model, and both test regrets."""
    train, test = make_problem(seed, deg, num_data, test_size)
    curve = []

    def on_epoch(i, model, loss):
        regret = float(test_regret(model, *test))
        curve.append(regret)
        if verbose and i == 0:
            print(f"  epoch  0  (initial model)      test regret {100 * regret:6.2f}%")
        elif verbose:
            print(f"  epoch {i:2d}  train loss {loss:8.4f}  test regret {100 * regret:6.2f}%")

    start = time.perf_counter()
    model, losses = train_fy(train, seed=seed, epochs=epochs, on_epoch=on_epoch)
    seconds = time.perf_counter() - start
    baseline = float(test_regret(two_stage(train, like=model), *test))
    return {
        "model": model,
        "test": test,
        "losses": losses,
        "regret_curve": curve,
        "fy_regret": curve[-1],
        "two_stage_regret": baseline,
        "seconds": seconds,
    }


def _plot(result, outdir: pathlib.Path, title: str):
    model, (x, c, y_opt) = result["model"], result["test"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(len(result["regret_curve"]))
    ax1.plot(epochs, 100 * np.asarray(result["regret_curve"]), marker="o", label="Fenchel-Young")
    ax1.axhline(100 * result["two_stage_regret"], color="tab:gray", ls="--", label="two-stage LR")
    ax1.set(xlabel="epoch", ylabel="normalized test regret (%)", title=title)
    ax1.legend()
    # one test instance: true costs as arc widths, optimal and predicted paths
    i = 0
    y_pred = np.asarray(solve(model(x[i])[None]))[0]
    rows, cols = GRID
    pos = np.array([(v % cols, -(v // cols)) for v in range(rows * cols)], float)
    for e, (u, v) in enumerate(ARCS):
        (x0, y0), (x1, y1) = pos[u], pos[v]
        width = 1 + 8 * float(c[i, e] / c[i].max())
        ax2.plot([x0, x1], [y0, y1], color="lightgray", lw=width, zorder=1)
        if y_opt[i, e] > 0.5:
            ax2.plot([x0, x1], [y0, y1], color="tab:green", lw=6, alpha=0.5, zorder=2)
        if y_pred[e] > 0.5:
            ax2.plot([x0, x1], [y0, y1], color="tab:red", lw=2, zorder=3)
    ax2.plot([], [], color="tab:green", lw=6, alpha=0.5, label="optimal path")
    ax2.plot([], [], color="tab:red", lw=2, label="predicted path")
    ax2.scatter(pos[:, 0], pos[:, 1], s=12, color="black", zorder=4)
    ax2.set(title="test instance 0 (arc width = true cost)", xticks=[], yticks=[])
    ax2.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(outdir / "shortest_path.png", dpi=100)
    plt.close(fig)


def main(quick: bool = False, outdir: str = "examples/out") -> dict:
    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        print("quick run: deg 4, seed 42, 5 epochs")
        result = run(42, 4, epochs=5)
        _plot(result, out, "deg 4, seed 42 (quick)")
        print(
            f"final test regret {100 * result['fy_regret']:.2f}% "
            f"(two-stage LR {100 * result['two_stage_regret']:.2f}%)"
        )
        return {
            "initial_test_regret": result["regret_curve"][0],
            "final_test_regret": result["fy_regret"],
            "two_stage_regret": result["two_stage_regret"],
            "losses": result["losses"],
        }
    summary: dict = {}
    for deg in (4, 6):
        fy, ls = [], []
        for seed in (42, 0, 1):
            print(f"deg {deg}, seed {seed}:")
            result = run(seed, deg)
            fy.append(result["fy_regret"])
            ls.append(result["two_stage_regret"])
            print(
                f"  -> Fenchel-Young {100 * fy[-1]:.2f}%  two-stage LR {100 * ls[-1]:.2f}%  "
                f"({result['seconds']:.1f} s for 20 epochs, compilation included)"
            )
            if deg == 4 and seed == 42:
                _plot(result, out, "deg 4, seed 42")
        summary[deg] = {"fenchel_young": fy, "two_stage": ls}
        print(
            f"deg {deg}: mean test regret over seeds 42, 0, 1: Fenchel-Young "
            f"{100 * np.mean(fy):.2f}%, two-stage LR {100 * np.mean(ls):.2f}%"
        )
    return {
        "final_test_regret": float(np.mean(summary[4]["fenchel_young"])),
        "two_stage_regret": float(np.mean(summary[4]["two_stage"])),
        "deg6_final_test_regret": float(np.mean(summary[6]["fenchel_young"])),
        "deg6_two_stage_regret": float(np.mean(summary[6]["two_stage"])),
        "per_seed": summary,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
