"""A custom solver, registered by name and trained from a config.

The task: find where an event happens in a noisy two-channel signal. An event is a
window of `length` consecutive time steps during which channel 1 oscillates; the
target is the 0/1 indicator of that window. The structure ("exactly one contiguous
window of a given length") is not one of structpert's built-in solvers, so we write
it, register it under the name `"interval"`, and build the whole training run
(solver, noise, layer, loss, optimiser) from a plain dictionary, as a config file
would. The model is a small equinox 1-D CNN that scores each time step; the
Fenchel-Young loss trains it from the target windows.

Metric: the mean intersection-over-union (IoU) of predicted and true windows on test
signals, and the fraction of exactly found windows.

Run it with

    python examples/custom_solver.py            # full settings, minutes on a CPU
    python examples/custom_solver.py --quick    # small settings, what the tests run

It prints progress and saves `custom_solver.png` (IoU curve and one test signal) in
`--outdir`.
"""

import argparse
import pathlib
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import optax
from jaxtyping import Array, Float

import structpert as sp


# 1. The solver: maximise <y, theta> over indicators of windows of `length` steps.
@sp.register_solver("interval")
class Interval(sp.AbstractSolver):
    """The 0/1 indicator of the contiguous window of `length` steps of largest sum."""

    length: int = eqx.field(static=True)
    event_ndim: ClassVar[int] = 1

    def __check_init__(self):
        if not isinstance(self.length, int) or self.length < 1:
            raise ValueError(f"Interval: `length` must be an int >= 1, got {self.length!r}")

    def argmax(self, theta: Float[Array, " T"]) -> Float[Array, " T"]:
        (t,) = theta.shape
        if self.length > t:
            raise ValueError(f"Interval: `length`={self.length} exceeds the signal length {t}")
        sums = jnp.cumsum(jnp.concatenate([jnp.zeros(1, theta.dtype), theta]))
        window_sums = sums[self.length :] - sums[: -self.length]  # one per start
        start = jnp.argmax(window_sums)
        steps = jnp.arange(t)
        return ((steps >= start) & (steps < start + self.length)).astype(theta.dtype)


# 2. The config: everything a run needs, as plain data.
CONFIG = {
    "solver": {"name": "interval", "length": 8},
    "noise": "normal",
    "sigma": 0.5,
    "num_samples": 16,
    "learning_rate": 3e-3,
    "batch_size": 32,
    "steps": 1500,
    "quick_steps": 120,
}
NOISES = {"normal": sp.Normal, "gumbel": sp.Gumbel}


def build_loss(config) -> sp.FenchelYoungLoss:
    solver_config = dict(config["solver"])
    solver = sp.make_solver(solver_config.pop("name"), **solver_config)
    layer = sp.PerturbedOptimizer(
        solver,
        noise=NOISES[config["noise"]](),
        sigma=config["sigma"],
        num_samples=config["num_samples"],
    )
    return sp.FenchelYoungLoss(layer)


# 3. Data and model.
def make_data(num_signals, signal_length, event_length, seed):
    """Signals (N, 2, T) and 0/1 event windows (N, T)."""
    rng = np.random.default_rng(seed)
    signals = rng.normal(scale=0.7, size=(num_signals, 2, signal_length))
    windows = np.zeros((num_signals, signal_length))
    starts = rng.integers(0, signal_length - event_length + 1, size=num_signals)
    steps = np.arange(event_length)
    for i, s in enumerate(starts):
        phase = rng.uniform(0, 2 * np.pi)
        signals[i, 1, s : s + event_length] += 1.5 * np.sin(np.pi / 2 * steps + phase)
        windows[i, s : s + event_length] = 1.0
    return jnp.asarray(signals, jnp.float32), jnp.asarray(windows, jnp.float32)


class CNN(eqx.Module):
    """Two 1-D convolutions: a signal (2, T) -> one score per time step (T,)."""

    conv1: eqx.nn.Conv1d
    conv2: eqx.nn.Conv1d

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv1 = eqx.nn.Conv1d(2, 16, kernel_size=5, padding=2, key=k1)
        self.conv2 = eqx.nn.Conv1d(16, 1, kernel_size=5, padding=2, key=k2)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.conv1(x)))[0]


def evaluate(model, solver, x, windows):
    predicted = jax.vmap(solver.argmax)(jax.vmap(model)(x))
    overlap = jnp.sum(predicted * windows, axis=-1)
    iou = overlap / (2 * solver.length - overlap)
    return jnp.mean(iou), jnp.mean(overlap == solver.length)


def main(quick: bool = False, outdir: str = "examples/out", config=None) -> dict:
    config = dict(CONFIG if config is None else config)
    steps = config["quick_steps"] if quick else config["steps"]
    signal_length, event_length = 48, config["solver"]["length"]
    num_train, num_test = (400, 300) if quick else (3000, 1000)
    x_train, w_train = make_data(num_train, signal_length, event_length, seed=0)
    x_test, w_test = make_data(num_test, signal_length, event_length, seed=1)

    loss_fn = build_loss(config)
    solver = loss_fn.optimizer.solver
    print(f"solvers registered: {sp.list_solvers()}; training with {solver}")
    key, init_key = jax.random.split(jax.random.key(0))
    model = CNN(init_key)
    optim = optax.adam(config["learning_rate"])
    opt_state = optim.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y, key):
        def batch_loss(model):
            return jnp.mean(loss_fn(jax.vmap(model)(x), y, key=key))

        loss, grads = eqx.filter_value_and_grad(batch_loss)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    score = eqx.filter_jit(evaluate)
    iou, exact = map(float, score(model, solver, x_test, w_test))
    history = [(0, iou, exact)]
    print(f"initial test IoU {iou:.3f}  exact {exact:.3f}")
    rng = np.random.default_rng(0)
    for i in range(1, steps + 1):
        idx = rng.choice(num_train, config["batch_size"], replace=False)
        key, subkey = jax.random.split(key)
        model, opt_state, loss = step(model, opt_state, x_train[idx], w_train[idx], subkey)
        if i % (steps // 10) == 0:
            iou, exact = map(float, score(model, solver, x_test, w_test))
            history.append((i, iou, exact))
            print(f"step {i:5d}  loss {float(loss):.4f}  test IoU {iou:.3f}  ", end="")
            print(f"exact {exact:.3f}")

    out = pathlib.Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps_seen, ious, exacts = zip(*history)
    ax1.plot(steps_seen, ious, marker="o", label="IoU")
    ax1.plot(steps_seen, exacts, marker="s", label="exact window")
    ax1.set(xlabel="step", ylim=(0, 1))
    ax1.legend()
    ax2.plot(np.asarray(x_test[0, 1]), color="tab:gray", label="channel 1")
    ax2.plot(np.asarray(model(x_test[0])), color="tab:blue", label="score")
    ax2.fill_between(
        range(signal_length),
        0,
        3 * np.asarray(w_test[0]),
        alpha=0.2,
        color="tab:green",
        label="true window",
    )
    ax2.plot(
        3 * np.asarray(solver.argmax(model(x_test[0]))),
        color="tab:red",
        label="predicted window",
    )
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "custom_solver.png", dpi=100)
    plt.close(fig)
    return {
        "initial_test_iou": history[0][1],
        "final_test_iou": history[-1][1],
        "final_exact": history[-1][2],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small, fast run")
    parser.add_argument("--outdir", default="examples/out", help="where to save plots")
    args = parser.parse_args()
    main(quick=args.quick, outdir=args.outdir)
