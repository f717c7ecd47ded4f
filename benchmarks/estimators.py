"""Gradient estimators: structpert against jaxopt.perturbations and optax.perturbations.

Three parts, all peers measured side by side in one run, in float32 as users run them
(and four more on structpert alone: `bias`, of its estimators, `fewsamples`, `rankings`
and `memory`):

1. **Gradient mean squared error at equal solver calls.** Solver calls are counted,
   not assumed: a `jax.pure_callback` solver counts the instances each library solves
   under `jax.value_and_grad` (jaxopt solves 2M, optax M + 1, structpert M, or M + 1
   with the `"unperturbed"` control variate). Each library then gets the same budget
   of calls per gradient. Problems: the simplex with Gumbel noise (exact answer:
   softmax, Jacobian (diag p - p p^T) / eps), ranking, top-k and a 5 x 5 assignment
   with Normal noise (reference from 10^6 samples), several random instances each.
   Two gradients: the notebook's loss on the perturbed argmax, ||y_eps(theta) -
   y_target||^2 (goes through the Jacobian estimator), and the Fenchel-Young loss
   (exact gradient y_eps - y). Each MSE is the mean over independent keys of ||g_hat - g||^2.
2. **Time per `value_and_grad` step** at d = 100, M = 1000, against the floor: the
   bare vmapped solver on the same M perturbed inputs (given), and drawing the noise
   plus solving. Peers use the same solver function as structpert's
   `FunctionSolver` row; structpert's own solver classes are shown too. Then the same
   for a batch of 32 instances per step (simplex and top-10; the peers vmapped with
   one key per instance).
3. **The seed notebook's ranking pipeline** end to end (n = 6, 100 samples,
   sigma 0.2, Gumbel, 20 jitted gradient steps on the squared loss of the perturbed
   ranks), with jaxopt, with `structpert.perturbations` as a drop-in (same `ranking`
   function, a double argsort) and with `sp.Permutahedron` (one sort); also at
   n = 100, M = 1000.
4. **Few samples** (structpert only): the control variates at M <= 2d.
5. **Rankings** (structpert only): the conditional Monte-Carlo Jacobian against the
   score function, time per step for rankings of 6 to 200 items, one instance and a
   batch of 32 (where `jacobian="auto"` stops taking the conditional one).
6. **Memory** (structpert only) of the layer, of a gradient step of a loss on y_eps
   and of the Fenchel-Young gradient step, with and without `chunk_size` (streamed
   sums; independent and, on the simplex, stratified draws), from XLA's accounting
   of the compiled steps.

Timings are the minimum over repeats (the machine is shared with other jobs).

Run it with

    python benchmarks/estimators.py                  # everything (tens of minutes, most of it MSE)
    python benchmarks/estimators.py --quick          # smaller reference, fewer repeats
    python benchmarks/estimators.py --parts timing   # one part (calls, mse, bias,
                                                     # fewsamples, timing, rankings,
                                                     # pipeline, memory)
    python benchmarks/estimators.py --parts mse --only n=6 --keys 4000
                                                     # some problems, more keys
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax.perturbations as op
from jaxopt import perturbations as jp

import structpert as sp


F32 = jnp.float32


# ---------------------------------------------------------------------------
# Solver functions, one instance each (the form jaxopt and optax take)


def one_hot(x):
    return jax.nn.one_hot(jnp.argmax(x), x.shape[-1], dtype=x.dtype)


def ranking(x):  # the notebook's ranking: a double argsort
    return jnp.argsort(jnp.argsort(x)).astype(x.dtype)


ASSIGNMENT = sp.BipartiteMatching(method="jax")


def make_assignment(n):  # an n x n assignment on flat vectors of n * n weights
    return lambda x: ASSIGNMENT.argmax(x.reshape(n, n)).reshape(-1)


def make_topk(k):
    def topk(x):
        _, idx = jax.lax.top_k(x, k)
        return jnp.zeros_like(x).at[idx].set(1)

    return topk


NOISES = {
    "gumbel": (sp.Gumbel(), jp.Gumbel(), op.Gumbel()),
    "normal": (sp.Normal(), jp.Normal(), op.Normal()),
}


def best_time(fn, repeats):
    """Minimum wall-clock seconds of `fn()` over `repeats` runs, after a warm-up."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


# ---------------------------------------------------------------------------
# Part 0: count the solver calls of each library under value_and_grad


def count_calls(m=10, d=5):
    counter = [0]

    def host(x):
        x = np.asarray(x)
        counter[0] += x.reshape(-1, x.shape[-1]).shape[0]
        return np.argsort(np.argsort(x, -1), -1).astype(x.dtype)

    def solver(x):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(host, shape, x, vmap_method="broadcast_all")

    theta = jnp.linspace(1.0, -1.0, d, dtype=F32)
    y = jnp.arange(d, dtype=F32)
    key = jax.random.key(0)
    sq = lambda a: jnp.sum((a - y) ** 2)
    jo = jp.make_perturbed_argmax(solver, m, 0.5, jp.Normal())
    jo_cv = jp.make_perturbed_argmax(solver, m, 0.5, jp.Normal(), control_variate=True)
    jo_max = jp.make_perturbed_max(solver, m, 0.5, jp.Normal())
    ox = op.make_perturbed_fun(solver, m, 0.5, op.Normal())
    ox_max = op.make_perturbed_fun(lambda t: jnp.sum(t * solver(t)), m, 0.5, op.Normal())
    fs = sp.FunctionSolver(solver, event_ndim=1)
    ours = sp.PerturbedOptimizer(fs, sp.Normal(), 0.5, m)
    ours_u = sp.PerturbedOptimizer(fs, sp.Normal(), 0.5, m, control_variate="unperturbed")
    ours_r = sp.PerturbedOptimizer(fs, sp.Normal(), 0.5, m, control_variate="regression")
    ours_l = sp.PerturbedOptimizer(fs, sp.Normal(), 0.5, m, control_variate="leave_one_out")
    ours_o = sp.PerturbedOptimizer(fs, sp.Normal(), 0.5, m, orthogonal=True)
    cases = {
        "jaxopt argmax": lambda t: sq(jo(t, key)),
        "jaxopt argmax, control_variate=True": lambda t: sq(jo_cv(t, key)),
        "jaxopt max (FY)": lambda t: jo_max(t, key) - t @ y,
        "optax fun": lambda t: sq(ox(key, t)),
        "optax max (FY)": lambda t: ox_max(key, t) - t @ y,
        "structpert argmax (default: covariance)": lambda t: sq(ours(t, key=key)),
        "structpert argmax, leave_one_out": lambda t: sq(ours_l(t, key=key)),
        "structpert argmax, unperturbed": lambda t: sq(ours_u(t, key=key)),
        "structpert argmax, regression": lambda t: sq(ours_r(t, key=key)),
        "structpert argmax, orthogonal": lambda t: sq(ours_o(t, key=key)),
        "structpert FY": lambda t: sp.FenchelYoungLoss(ours)(t, y, key=key),
    }
    out = {}
    for name, f in cases.items():
        counter[0] = 0
        jax.block_until_ready(jax.jit(jax.value_and_grad(f))(theta))
        out[name] = counter[0] / m
    return out


# ---------------------------------------------------------------------------
# Part 1: gradient MSE at equal solver calls


def reference(fn, noise, theta, eps, n_total, chunk=20_000, seed=12345, exchanges=None):
    """y_eps and the (symmetrised) Jacobian from n_total samples, accumulated in
    float64 on the host, written out here independently of the libraries: the plain
    estimator of Berthet et al. (Prop. 3.1) with the chunk mean as baseline or, given
    `exchanges` (x (N, d) -> the levels (N, d, K) at which entry i takes over from
    partners (N, d, K), None for "partner k is entry k"), conditional Monte Carlo
    over each entry's own noise, whose error is far lower (see the guide)."""
    d = theta.shape[0]
    if exchanges is not None:  # at most about 2^24 levels per chunk
        chunk = min(chunk, max(1000, 2**24 // (d * d)))

    @jax.jit
    def chunk_sums(key):
        z = noise.sample(key, (chunk, d), F32)
        x = theta + eps * z
        y = jax.vmap(fn)(x)
        if exchanges is None:
            c = y - y.mean(0)
            return y.sum(0), c.T @ noise.grad_nu(z) / eps
        levels, partners = exchanges(x)
        w = noise.density((levels - theta[None, :, None]) / eps) / eps  # (N, d, K)
        # column i gains w (e_i - e_partner)
        if partners is None:  # partner k is entry k
            a = jnp.sum(w, axis=0)
            return y.sum(0), jnp.diag(a.sum(1)) - a.T
        cols = jnp.broadcast_to(jnp.arange(d)[None, :, None], w.shape)
        jac = jnp.zeros((d, d)).at[cols, cols].add(w).at[partners, cols].add(-w)
        return y.sum(0), jac

    y_sum = np.zeros(d)
    j_sum = np.zeros((d, d))
    n = 0
    key = jax.random.key(seed)
    while n < n_total:
        key, sub = jax.random.split(key)
        ys, js = chunk_sums(sub)
        y_sum += np.asarray(ys, np.float64)
        j_sum += np.asarray(js, np.float64)
        n += chunk
    jac = j_sum / n
    return y_sum / n, (jac + jac.T) / 2


def top_exchanges(k):
    """Levels of top-k (k = 1: the one-hot argmax) for the conditional reference: a
    selected entry leaves for the best unselected one below its value, an unselected
    one enters in place of the weakest selected one above it."""
    def exchanges(x):
        vals, idx = jax.lax.top_k(x, k + 1)
        rows = jnp.arange(x.shape[0])[:, None]
        selected = jnp.zeros(x.shape, bool).at[rows, idx[:, :k]].set(True)
        levels = jnp.where(selected, vals[:, k:k + 1], vals[:, k - 1:k])
        partners = jnp.where(selected, idx[:, k:k + 1], idx[:, k - 1:k])
        return levels[..., None], partners[..., None]

    return exchanges


def rank_exchanges(x):
    """Levels of the ranking: every other entry's value (partner k is entry k)."""
    return jnp.broadcast_to(x[:, None, :], (*x.shape, x.shape[1])), None


def gradient_mse(problem, budget, reps, n_ref):
    """MSE of each estimator on each instance of `problem` at `budget` solver calls."""
    fn, sp_solver = problem["fn"], problem["solver"]
    sp_noise, jo_noise, ox_noise = NOISES[problem["noise"]]
    eps = problem["eps"]
    shape = problem["shape"]  # structpert's layers take instances of this shape
    m_jo, m_ox = budget // 2, budget - 1  # jaxopt solves 2M, optax M + 1
    symmetric = problem["noise"] == "normal"

    def ours(**kw):
        m = budget - 1 if kw.get("control_variate") == "unperturbed" else budget
        return sp.PerturbedOptimizer(sp_solver, sp_noise, eps, m, **kw)

    def score(**kw):  # the score-function estimator with these options
        return ours(jacobian="score", **kw)

    # The default is the conditional estimator where the solver lists its exchanges
    # (simplex, top-k, ranking) and the score function otherwise (the assignment);
    # the score function's default control variate is "covariance" with Normal
    # noise, "leave_one_out" with Gumbel.
    layers = {"structpert": ours()}
    if not ours()._conditional_missing():  # the solver lists its exchanges

        def cond(**kw):
            return ours(jacobian="conditional", **kw)

        by_default = ours()._conditional(shape)  # not for rankings of more than 100 items
        if not by_default:
            layers["sp, conditional"] = cond()
        layers["sp, cond. + stratified"] = cond(stratified=True)
        if symmetric:
            layers["sp, cond. + antithetic"] = cond(antithetic=True)
        if by_default:
            layers["sp, score function"] = score()
    layers.update({
        "sp, no symmetrisation": score(symmetric_jacobian=False),
        "sp, unperturbed cv": score(control_variate="unperturbed"),
        "sp, no cv": score(control_variate="none"),
    })
    layers["sp, regression"] = score(control_variate="regression")
    layers["sp, stratified"] = score(stratified=True)
    if not symmetric:
        layers["sp, covariance"] = score(control_variate="covariance")
    if symmetric:
        layers["sp, leave-one-out"] = score(control_variate="leave_one_out")
        layers["sp, antithetic"] = score(antithetic=True)
        layers["sp, regr. + antithetic"] = score(control_variate="regression", antithetic=True)
        layers["sp, orthogonal"] = score(orthogonal=True)
        layers["sp, orth. + regression"] = score(orthogonal=True, control_variate="regression")
        layers["sp, orth. + regr. + anti."] = score(
            orthogonal=True, control_variate="regression", antithetic=True
        )
        layers["sp, orth. + antithetic"] = score(orthogonal=True, antithetic=True)
        layers["sp, orth. + leave-one-out"] = score(
            orthogonal=True, control_variate="leave_one_out"
        )
    argmax_fns = {
        k: (lambda t, key, o=o: o(t.reshape(shape), key=key).reshape(-1))
        for k, o in layers.items()
    }
    jo_f = jp.make_perturbed_argmax(fn, m_jo, eps, jo_noise)
    jo_cv = jp.make_perturbed_argmax(fn, (budget - 1) // 2, eps, jo_noise, True)
    ox_f = op.make_perturbed_fun(fn, m_ox, eps, ox_noise)
    ox_nb = op.make_perturbed_fun(fn, budget, eps, ox_noise, use_baseline=False)
    argmax_fns.update(
        {
            "jaxopt": lambda t, key: jo_f(t, key),
            "jaxopt, control_variate": lambda t, key: jo_cv(t, key),
            "optax": lambda t, key: ox_f(key, t),
            "optax, no baseline": lambda t, key: ox_nb(key, t),
        }
    )
    # The Fenchel-Young gradient: with conditional Monte Carlo, E[y | the other
    # entries' noise]; with the score function ("score" columns), the mean of the
    # solutions.
    fy_layers = {"structpert": layers["structpert"]}
    for name in ("sp, conditional", "sp, cond. + stratified", "sp, cond. + antithetic",
                 "sp, score function"):
        if name in layers:
            fy_layers[name] = layers[name]
    fy_layers["sp, stratified"] = layers["sp, stratified"]
    if symmetric:
        fy_layers["sp, antithetic"] = layers["sp, antithetic"]
        fy_layers["sp, orthogonal"] = layers["sp, orthogonal"]
        fy_layers["sp, strat. + antithetic"] = score(stratified=True, antithetic=True)
    jo_max = jp.make_perturbed_max(fn, m_jo, eps, jo_noise)
    ox_max = op.make_perturbed_fun(lambda t: jnp.sum(t * fn(t)), m_ox, eps, ox_noise)
    fy_fns = {
        k: (lambda t, y, key, o=o: sp.FenchelYoungLoss(o)(t.reshape(shape), y.reshape(shape),
                                                         key=key))
        for k, o in fy_layers.items()
    }
    fy_fns["jaxopt"] = lambda t, y, key: jo_max(t, key) - t @ y
    fy_fns["optax"] = lambda t, y, key: ox_max(key, t) - t @ y

    thetas = jnp.asarray(np.stack(problem["thetas"]), F32)
    y_target = jnp.asarray(problem["target"], F32)
    y_trues = jax.vmap(fn)(thetas + jnp.asarray(np.stack(problem["shift"]), F32))
    g_loss, g_fy = [], []
    for theta, y_true in zip(np.asarray(thetas), np.asarray(y_trues)):
        if problem["exact"]:
            p = np.asarray(jax.nn.softmax(np.asarray(theta, np.float64) / eps))
            jac = (np.diag(p) - np.outer(p, p)) / eps
        else:
            p, jac = reference(fn, sp_noise, jnp.asarray(theta), eps, n_ref,
                               exchanges=problem["exchanges"])
        g_loss.append(2 * jac.T @ (p - np.asarray(y_target)))
        g_fy.append(p - y_true)
    g_loss, g_fy = np.stack(g_loss), np.stack(g_fy)
    keys = jax.random.split(jax.random.key(100), reps)
    rows = [{"instance": i} for i in range(len(thetas))]

    def record(kind, name, grad, args):
        # all instances and keys in one compiled call
        per_key = jax.vmap(grad, in_axes=(None,) * (len(args) - 1) + (0,))
        g = jax.jit(jax.vmap(per_key, in_axes=(0,) * (len(args) - 1) + (None,)))(*args)
        ref = g_loss if kind == "loss" else g_fy
        mse = np.mean(np.sum((np.asarray(g, np.float64) - ref[:, None]) ** 2, -1), -1)
        for row, value in zip(rows, mse):
            row[(kind, name)] = float(value)

    for name, f in argmax_fns.items():
        grad = jax.grad(lambda t, key, f=f: jnp.sum((f(t, key) - y_target) ** 2))
        record("loss", name, grad, (thetas, keys))
    for name, f in fy_fns.items():
        record("fy", name, jax.grad(f), (thetas, y_trues, keys))
    return rows


def make_problems(quick):
    rng = np.random.default_rng(0)
    notebook = np.array([-0.6, 1.9, -0.2, 1.1, -1.0])

    def thetas(d, n=3, first=None):
        out = [first] if first is not None else []
        while len(out) < n:
            out.append(rng.normal(size=d))
        return out

    def problem(name, fn, solver, noise, d, eps, first=None, exact=False, target=None,
                shape=None, exchanges=None):
        ths = thetas(d, first=first)
        return dict(
            name=name,
            fn=fn,
            solver=solver,
            noise=noise,
            d=d,
            shape=shape or (d,),
            eps=eps,
            thetas=ths,
            shift=[rng.normal(size=d) for _ in ths],
            exact=exact,
            target=target,
            exchanges=exchanges,
        )

    simplex_target = lambda d: (np.arange(d) + 2) / np.sum(np.arange(d) + 2)
    problems = [
        problem("simplex d=5 eps=0.5 Gumbel", one_hot, sp.Simplex(), "gumbel", 5, 0.5,
                first=notebook, exact=True, target=simplex_target(5)),
        problem("simplex d=100 eps=0.5 Gumbel", one_hot, sp.Simplex(), "gumbel", 100,
                0.5, exact=True, target=simplex_target(100)),
        problem("simplex d=100 eps=0.1 Gumbel", one_hot, sp.Simplex(), "gumbel", 100,
                0.1, exact=True, target=simplex_target(100)),
        problem("ranking n=6 eps=0.2 Normal", ranking, sp.Permutahedron(), "normal", 6,
                0.2, target=np.arange(6.0), exchanges=rank_exchanges),
        problem("ranking n=100 eps=0.5 Normal", ranking, sp.Permutahedron(), "normal",
                100, 0.5, target=np.arange(100.0), exchanges=rank_exchanges),
        problem("top-10 n=100 eps=0.5 Normal", make_topk(10), sp.TopK(10), "normal", 100,
                0.5, target=(np.arange(100) >= 90).astype(float),
                exchanges=top_exchanges(10)),
        problem("assignment 5x5 eps=0.5 Normal", make_assignment(5), ASSIGNMENT, "normal",
                25, 0.5, target=np.eye(5).reshape(-1), shape=(5, 5)),
    ]
    return problems


def print_mse_tables(results, budget):
    peers = ("jaxopt", "optax")
    for kind, title in (
        ("loss", "squared loss on y_eps (Jacobian estimator)"),
        ("fy", "Fenchel-Young loss (gradient y_eps - y)"),
    ):
        print(f"\nGradient MSE, {title}, at {budget} solver calls per gradient,")
        print("as a ratio to the better of jaxopt and optax at their defaults")
        print("(< 1: structpert is better; the target is <= 0.5)")
        names = []
        for rows in results.values():
            for key in rows[0]:
                if isinstance(key, tuple) and key[0] == kind and key[1] not in names:
                    names.append(key[1])
        header = f"{'problem':30s} {'#':>2s} {'best peer MSE':>13s} " + " ".join(
            f"{n[:22]:>22s}" for n in names
        )
        print(header)
        for pname, rows in results.items():
            for row in rows:
                best = min(row[(kind, p)] for p in peers)
                cells = " ".join(
                    f"{row[(kind, n)] / best:22.3g}" if (kind, n) in row else " " * 22
                    for n in names
                )
                print(f"{pname:30s} {row['instance']:2d} {best:13.4g} {cells}")


def bias(reps=400, n_ref=1_000_000, cases=((20, 50), (20, 200), (100, 200), (100, 1000))):
    """Bias and error of the Jacobian estimate, default against "regression" and
    orthogonal sampling, on a ranking with Normal noise (eps = 0.5): relative to the
    norm of the reference Jacobian, the norm of (mean over `reps` keys - reference),
    the resolution of that check (the standard error of the mean, same units) and the
    root mean squared error of one estimate."""
    eps, rows = 0.5, []
    for d, m in cases:
        theta = jax.random.normal(jax.random.key(7), (d,), F32)
        _, ref = reference(ranking, sp.Normal(), theta, eps, n_ref)
        norm = np.linalg.norm(ref)
        for cv, orth in (("leave_one_out", False), ("regression", False),
                         ("leave_one_out", True)):
            opt = sp.PerturbedOptimizer(sp.Permutahedron(), sp.Normal(), eps, m,
                                        control_variate=cv, orthogonal=orth)
            jac = jax.jacrev(lambda t, k, opt=opt: opt(t, key=k))
            keys = jax.random.split(jax.random.key(m), reps)
            per_key = jax.jit(lambda ks, jac=jac: jax.lax.map(
                lambda k: jac(theta, k), ks, batch_size=10))  # bounded memory
            j = np.asarray(per_key(keys), np.float64)
            rows.append(dict(
                d=d, m=m, cv=cv + (" + orth." if orth else ""),
                bias=np.linalg.norm(j.mean(0) - ref) / norm,
                resolution=np.sqrt(j.var(0).sum() / reps) / norm,
                rmse=np.sqrt(np.mean(np.sum((j - ref) ** 2, axis=(1, 2)))) / norm,
            ))
    print(f"\nBias of the Jacobian estimate, ranking with Normal noise, eps={eps}, {reps} keys,")
    print(f"reference from {n_ref} samples; all relative to the norm of the reference")
    cols = ("d", 4), ("M", 5), ("estimator", 22), ("|bias|", 8), ("resolution", 10)
    print(" ".join(f"{name:>{width}s}" for name, width in cols) + f" {'rmse':>8s}")
    for r in rows:
        print(f"{r['d']:4d} {r['m']:5d} {r['cv']:>22s} {r['bias']:8.4f} {r['resolution']:10.4f} "
              f"{r['rmse']:8.4f}")
    return rows


# ---------------------------------------------------------------------------
# Part 2: time per value_and_grad step


def few_samples(keys=200, n_ref=200_000):
    """The score function's control variates at fewer samples than dimensions (M <=
    2d), where the scores' second moment is poorly known: MSE of the gradient of a
    squared loss on y_eps, as a ratio to leave-one-out's (structpert only; Normal
    noise, eps = 0.5, one random instance each, reference from n_ref samples, of the
    conditional estimator up to d = 100)."""
    ranks, top = (ranking, sp.Permutahedron(), rank_exchanges), (make_topk(10), sp.TopK(10),
                                                                 top_exchanges(10))
    cases = [
        ("ranking", *ranks, 100, 20),
        ("top-10", *top, 100, 20),
        ("ranking", *ranks, 100, 200),
        ("top-10", *top, 100, 200),
        ("ranking", *ranks, 400, 50),
        ("ranking", *ranks, 400, 200),
    ]
    options = {
        "covariance (score default)": {"control_variate": "covariance"},
        "regression": {"control_variate": "regression"},
        "orthogonal": {"orthogonal": True, "jacobian": "score"},
    }
    print("\nFew samples: gradient MSE of a squared loss on y_eps, ratio to leave-one-out,")
    print(f"Normal noise, eps 0.5, {keys} keys, reference from {n_ref} samples")
    print(f"{'problem':10s} {'d':>4s} {'M':>4s} {'leave-one-out MSE':>18s} "
          + " ".join(f"{name:>21s}" for name in options))
    rows = []
    for name, fn, solver, exchanges, d, m in cases:
        rng = np.random.default_rng(0)
        theta = jnp.asarray(rng.normal(size=d), F32)
        target = jnp.asarray(rng.normal(size=d), F32)
        # (the conditional reference of a ranking costs O(d^2) per sample)
        exact_enough = exchanges if d <= 100 else None
        p, jac = reference(fn, sp.Normal(), theta, 0.5, n_ref, exchanges=exact_enough)
        ref = 2 * jac.T @ (p - np.asarray(target))
        ks = jax.random.split(jax.random.key(100), keys)

        def mse(**kw):
            opt = sp.PerturbedOptimizer(solver, sp.Normal(), 0.5, m, **kw)
            grad = jax.grad(lambda t, k: jnp.sum((opt(t, key=k) - target) ** 2))
            g = jax.jit(jax.vmap(grad, in_axes=(None, 0)))(theta, ks)
            return float(np.mean(np.sum((np.asarray(g, np.float64) - ref) ** 2, -1)))

        base = mse(control_variate="leave_one_out")
        ratios = {k: mse(**kw) / base for k, kw in options.items()}
        print(f"{name:10s} {d:4d} {m:4d} {base:18.4g} "
              + " ".join(f"{r:21.3f}" for r in ratios.values()), flush=True)
        rows.append((name, d, m, base, ratios))
    return rows


def interleaved_best(fns, repeats):
    """Minimum seconds of each zero-argument function, timed in turns so that all see
    the same background load."""
    for f in fns.values():
        jax.block_until_ready(f())
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f())
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def timing(d=100, m=1000, repeats=20, batch=1, only=""):
    """Time per value_and_grad step; with batch > 1, a batch of instances per step
    (structpert takes the batch and one key; the peers, written for one instance, are
    vmapped with one key per instance)."""
    key = jax.random.key(0)
    theta = jax.random.normal(jax.random.key(1), (batch, d), F32)
    cases = [
        ("simplex, Gumbel", one_hot, sp.Simplex(), "gumbel", 0.5),
        ("ranking, Normal", ranking, sp.Permutahedron(), "normal", 0.5),
        ("top-10, Normal", make_topk(10), sp.TopK(10), "normal", 0.5),
    ]
    if batch > 1:  # the ranking is dominated by its sorts at any batch size
        cases = [c for c in cases if not c[0].startswith("ranking")]
    cases = [c for c in cases if only in c[0]]
    if not cases:
        return []

    def instances(f):
        """f(theta, key, y) of one instance -> summed over the batch (split keys)."""
        return lambda t, k, y: jnp.sum(jax.vmap(f)(t, jax.random.split(k, batch), y))

    rows = []
    for name, fn, solver, noise_name, eps in cases:
        sp_noise, jo_noise, ox_noise = NOISES[noise_name]
        y = jax.vmap(fn)(theta + 0.3)
        z = sp_noise.sample(jax.random.key(2), (batch, m, d), F32)
        perturbed = (theta[:, None] + eps * z).reshape(batch * m, d)
        sq = lambda a, y: jnp.sum((a - y) ** 2)
        layers = {
            "structpert": sp.PerturbedOptimizer(solver, sp_noise, eps, m),
            "sp FunctionSolver": sp.PerturbedOptimizer(
                sp.FunctionSolver(fn, event_ndim=1), sp_noise, eps, m
            ),
            "sp regression": sp.PerturbedOptimizer(
                solver, sp_noise, eps, m, control_variate="regression"
            ),
        }
        # the Jacobian estimator that is not the default here (conditional Monte Carlo
        # is the default for the argmax, top-k and rankings of up to 100 items)
        default = sp.PerturbedOptimizer(solver, sp_noise, eps, m)._conditional((d,))
        layers["sp score" if default else "sp conditional"] = sp.PerturbedOptimizer(
            solver, sp_noise, eps, m, jacobian="score" if default else "conditional"
        )
        # the control variate that is not the default for this noise
        other = "leave_one_out" if noise_name == "normal" else "covariance"
        layers[f"sp {other}"] = sp.PerturbedOptimizer(
            solver, sp_noise, eps, m, control_variate=other
        )
        if noise_name == "normal":
            layers["sp orthogonal"] = sp.PerturbedOptimizer(
                solver, sp_noise, eps, m, orthogonal=True
            )
        layers["sp stratified"] = sp.PerturbedOptimizer(solver, sp_noise, eps, m, stratified=True)
        jo = jp.make_perturbed_argmax(fn, m, eps, jo_noise)
        jo_max = jp.make_perturbed_max(fn, m, eps, jo_noise)
        ox = op.make_perturbed_fun(fn, m, eps, ox_noise)
        ox_max = op.make_perturbed_fun(lambda t, fn=fn: jnp.sum(t * fn(t)), m, eps, ox_noise)
        fns = {}
        for lib, solve in (("structpert", solver.argmax), ("fn", fn)):
            bare = jax.jit(jax.vmap(solve))
            # averaged, as every method returns y_eps: the M solutions need not be
            # written out in full (XLA fuses the mean into the solve)
            floor = jax.jit(
                lambda t, k, solve=solve: jnp.mean(
                    jax.vmap(solve)(
                        (t[:, None] + eps * sp_noise.sample(k, (batch, m, d), F32)).reshape(-1, d)
                    ).reshape(batch, m, d),
                    axis=1,
                )
            )
            fns[(lib, "bare")] = lambda bare=bare: bare(perturbed)
            fns[(lib, "floor")] = lambda floor=floor: floor(theta, key)
        losses = {}
        for lib, o in layers.items():
            losses[(lib, "loss")] = lambda t, k, y, o=o: sq(o(t, key=k), y)
            losses[(lib, "FY")] = lambda t, k, y, o=o: jnp.sum(
                sp.FenchelYoungLoss(o)(t, y, key=k)
            )
        peers = {
            ("jaxopt", "loss"): lambda t, k, y: sq(jo(t, k), y),
            ("jaxopt", "FY"): lambda t, k, y: jo_max(t, k) - t @ y,
            ("optax", "loss"): lambda t, k, y: sq(ox(k, t), y),
            ("optax", "FY"): lambda t, k, y: ox_max(k, t) - t @ y,
        }
        for lk, f in peers.items():
            losses[lk] = instances(f) if batch > 1 else f
        args = (theta, key, y) if batch > 1 else (theta[0], key, y[0])
        for lk, f in losses.items():
            vg = jax.jit(jax.value_and_grad(f))
            fns[lk] = lambda vg=vg, args=args: vg(*args)
        row = interleaved_best(fns, repeats)
        row["case"] = name
        rows.append(row)
    print(
        f"\nTime per value_and_grad step, d={d}, M={m}"
        + (f", a batch of {batch} instances" if batch > 1 else "")
        + f", float32, min of {repeats} runs"
    )
    print("taken in turns. bare = the vmapped solver on M given perturbed inputs;")
    print("floor = drawing the noise + perturbing + solving + averaging (what any method must do).")
    print("structpert's rows use its solver class: the default estimator (conditional Monte")
    print('Carlo for the argmax, top-k and the ranking of 100 items), the score function')
    print('("sp score"), the score function with the control variate that is not the')
    print('default for the noise ("covariance" or "leave_one_out") and with "regression",')
    print("orthogonal=True for Normal noise, and stratified=True (these two with the")
    print("default estimator);")
    print("the other rows use the same function")
    print("(jnp one_hot/argmax, the notebook's double-argsort ranking, lax.top_k).")
    for row in rows:
        print(f"\n{row['case']}")
        for lib, base in (("structpert", "structpert"), ("sp score", "structpert"),
                          ("sp conditional", "structpert"), ("sp regression", "structpert"),
                          ("sp covariance", "structpert"), ("sp leave_one_out", "structpert"),
                          ("sp orthogonal", "structpert"), ("sp stratified", "structpert"),
                          ("sp FunctionSolver", "fn"),
                          ("jaxopt", "fn"), ("optax", "fn")):
            if (lib, "loss") not in row:
                continue
            bare, floor = row[(base, "bare")], row[(base, "floor")]
            cells = [f"bare {bare * 1e3:7.3f} floor {floor * 1e3:7.3f} ms |"]
            for kind in ("loss", "FY"):
                t = row[(lib, kind)]
                cells.append(
                    f"{kind:4s} {t * 1e3:7.3f} ms = {t / bare:5.2f}x bare, "
                    f"{t / floor:5.2f}x floor"
                )
            print(f"  {lib:18s} " + "  ".join(cells))
    return rows


# ---------------------------------------------------------------------------
# Part 3: the seed notebook's ranking pipeline


FINAL_RUNS = 5  # runs of the pipeline's loop averaged for its final loss


def pipeline(n=6, m=100, sigma=0.2, steps=20, repeats=5):
    values = jax.random.normal(jax.random.key(0), (n,))
    y_true = ranking(jnp.arange(n, dtype=F32))
    from structpert import perturbations as spp

    layer = sp.PerturbedOptimizer(sp.Permutahedron(), sp.Gumbel(), sigma, m)
    variants = {
        "jaxopt (ranking fn)": jp.make_perturbed_argmax(ranking, m, sigma, jp.Gumbel()),
        "sp.perturbations (ranking fn)": spp.make_perturbed_argmax(
            ranking, m, sigma, spp.Gumbel()
        ),
        "sp.Permutahedron": lambda t, k: layer(t, key=k),
    }
    loops, steps_fns, out = {}, {}, {}
    step_key = jax.random.key(3)  # made once, outside the timed step
    for name, pert in variants.items():

        def loss(v, rng, pert=pert):
            return jnp.sum((y_true - pert(v, rng)) ** 2)

        def loop(grad_func, seed=0):
            # the notebook's loop, verbatim (its key: seed 0)
            rngs = jax.random.split(jax.random.key(seed), 2)
            v = values
            for _ in range(steps):
                rngs = jax.random.split(rngs[1], 2)
                v = v - 0.1 * grad_func(v, rngs[1])
            return v

        t0 = time.perf_counter()
        grad_func = jax.jit(jax.grad(loss))
        finals = [jax.block_until_ready(loop(grad_func))]
        first = time.perf_counter() - t0  # includes compilation
        # one run of noisy steps ends anywhere: the loss after the loop, over runs
        finals += [loop(grad_func, seed) for seed in range(1, FINAL_RUNS)]
        eval_keys = jax.random.split(jax.random.key(7), 10)
        losses = [jnp.mean(jax.vmap(lambda k, v=v: loss(v, k))(eval_keys)) for v in finals]
        out[name] = dict(first=first, loss=float(np.mean(losses)))
        loops[name] = lambda grad_func=grad_func, loop=loop: loop(grad_func)
        steps_fns[name] = lambda g=grad_func: g(values, step_key)
    t_loop = interleaved_best(loops, repeats)
    t_step = interleaved_best(steps_fns, 10 * repeats)
    base = "jaxopt (ranking fn)"
    print(f"\nNotebook ranking pipeline: n={n}, M={m}, sigma={sigma}, {steps} jitted steps")
    print(f"(final loss: the mean over {FINAL_RUNS} runs of the loop with different keys)")
    print(
        f"{'variant':30s} {'1st run s':>9s} {'loop ms':>8s} {'step ms':>8s} "
        f"{'step vs jaxopt':>14s} {'final loss':>10s}"
    )
    for name, r in out.items():
        print(
            f"{name:30s} {r['first']:9.2f} {t_loop[name] * 1e3:8.2f} "
            f"{t_step[name] * 1e3:8.3f} {t_step[name] / t_step[base]:13.2f}x "
            f"{r['loss']:10.3f}"
        )
        r.update(loop=t_loop[name], step=t_step[name])
    return out


# ---------------------------------------------------------------------------
# Part 5: memory of the compiled steps with chunk_size (structpert only)


def memory(b=4, m=2000, d=500, chunk=400, repeats=5):
    """XLA's temporary memory and the time of three compiled steps (the layer alone,
    value_and_grad of a squared loss on y_eps, value_and_grad of the FY loss), with
    all b x m perturbed instances at once and with chunk_size (streamed)."""
    theta = jax.random.normal(jax.random.key(1), (b, d), F32)
    y = jnp.zeros((b, d), F32)
    key = jax.random.key(0)
    steps = {
        "layer": lambda opt: lambda t, k: opt(t, key=k),
        "loss on y_eps, grad": lambda opt: jax.value_and_grad(
            lambda t, k: jnp.sum((opt(t, key=k) - y) ** 2)
        ),
        "FY loss, grad": lambda opt: jax.value_and_grad(
            lambda t, k: sp.FenchelYoungLoss(opt)(t, y, key=k).sum()
        ),
    }
    rows = []
    configs = (
        ("simplex", sp.Simplex(), {}),
        ("simplex, stratified", sp.Simplex(), {"stratified": True}),
        ("ranking", sp.Permutahedron(), {}),
    )
    for name, solver, kw in configs:
        for what, make in steps.items():
            for chunk_size in (None, chunk):
                opt = sp.PerturbedOptimizer(
                    solver, sp.Normal(), 0.5, m, chunk_size=chunk_size, **kw
                )
                step = jax.jit(make(opt)).lower(theta, key).compile()
                stats = step.memory_analysis()
                temp = stats.temp_size_in_bytes / 1e6 if stats is not None else float("nan")
                t = best_time(lambda step=step: step(theta, key), repeats)
                rows.append((name, what, chunk_size, temp, t))
    print(f"\nMemory with chunk_size, batch {b}, M={m}, d={d}, Normal noise, float32")
    print(f"(one array of all instances: {b * m * d * 4 / 1e6:.1f} MB; XLA's temporary memory)")
    for name, what, chunk_size, temp, t in rows:
        print(
            f"  {name:19s} {what:20s} chunk_size={str(chunk_size):5s} temp {temp:7.1f} MB"
            f"  {t * 1e3:8.1f} ms"
        )
    return rows


def rankings(sizes=(6, 32, 64, 100, 200), batches=(1, 32), m=1000, repeats=10):
    """The two Jacobian estimators on rankings of d items (structpert only): time per
    value_and_grad step of a squared loss on y_eps and of the FY loss, conditional
    Monte Carlo (O(M d^2): every other entry is a level) against the score function
    (O(M d)). `jacobian="auto"` takes the conditional one up to 100 items."""
    rows = []
    key = jax.random.key(0)  # made once: making a key costs about 0.09 ms on this CPU
    print(f"\nRankings, Normal noise, sigma 0.5, M={m}, float32: ms per value_and_grad step,")
    print(f"min of {repeats} runs taken in turns")
    for batch in batches:
        for d in sizes:
            theta = jax.random.normal(jax.random.key(1), (batch, d), F32)
            y = jax.vmap(ranking)(theta + 0.3)
            fns = {}
            for jac in ("score", "conditional"):
                opt = sp.PerturbedOptimizer(sp.Permutahedron(), sp.Normal(), 0.5, m, jacobian=jac)
                steps = {
                    "loss": lambda t, k, opt=opt: jnp.sum((opt(t, key=k) - y) ** 2),
                    "FY": lambda t, k, opt=opt: jnp.sum(sp.FenchelYoungLoss(opt)(t, y, key=k)),
                }
                for what, f in steps.items():
                    vg = jax.jit(jax.value_and_grad(f))
                    fns[(jac, what)] = lambda vg=vg: vg(theta, key)
            best = interleaved_best(fns, repeats)
            rows.append((batch, d, best))
            ms = {k: v * 1e3 for k, v in best.items()}
            print(
                f"  batch {batch:3d}  d {d:4d}  loss on y_eps: score {ms[('score', 'loss')]:8.3f}"
                f"  conditional {ms[('conditional', 'loss')]:8.3f}"
                f"  |  FY: score {ms[('score', 'FY')]:8.3f}"
                f"  conditional {ms[('conditional', 'FY')]:8.3f}",
                flush=True,
            )
    return rows


def main(
    quick: bool = False,
    budget: int = 200,
    parts=("calls", "mse", "bias", "fewsamples", "timing", "rankings", "pipeline", "memory"),
    only: str = "",
    keys: int = 0,
):
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    out = {}
    if "calls" in parts:
        print("\nSolver calls per value_and_grad, in units of num_samples M (M = 10), counted")
        out["calls"] = count_calls()
        for name, calls in out["calls"].items():
            print(f"    {name:40s} {calls:.1f} M")
    if "mse" in parts:
        reps = keys or (100 if quick else 400)
        n_ref = 200_000 if quick else 1_000_000
        out["mse"] = {}
        for problem in make_problems(quick):
            if only and only not in problem["name"]:
                continue
            t0 = time.perf_counter()
            out["mse"][problem["name"]] = gradient_mse(problem, budget, reps, n_ref)
            print(f"  measured {problem['name']} in {time.perf_counter() - t0:.0f} s", flush=True)
        print(f"\n{reps} keys per estimate; reference: exact (simplex) or {n_ref} samples.")
        print_mse_tables(out["mse"], budget)
    if "bias" in parts:
        out["bias"] = bias(reps=100 if quick else 400, n_ref=200_000 if quick else 1_000_000)
    if "fewsamples" in parts:
        out["fewsamples"] = few_samples(keys=100 if quick else 200)
    repeats = 5 if quick else 20
    if "timing" in parts:
        out["timing"] = timing(repeats=repeats, only=only)
        out["timing_batch"] = timing(repeats=max(3, repeats // 4), batch=32, only=only)
    if "rankings" in parts:
        out["rankings"] = rankings(repeats=max(3, repeats // 2))
    if "pipeline" in parts:
        out["pipeline"] = pipeline(repeats=repeats)
        out["pipeline100"] = pipeline(n=100, m=1000, sigma=0.2, repeats=max(3, repeats // 4))
    if "memory" in parts:
        out["memory"] = memory(repeats=max(3, repeats // 4))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller and faster")
    parser.add_argument("--budget", type=int, default=200, help="solver calls per gradient")
    parser.add_argument(
        "--parts",
        default="calls,mse,bias,fewsamples,timing,rankings,pipeline,memory",
        help="comma-separated subset of calls,mse,bias,fewsamples,timing,rankings,pipeline,"
        "memory",
    )
    parser.add_argument(
        "--only",
        default="",
        help='MSE and timing parts: problems whose name contains this, e.g. "n=6", "ranking"',
    )
    parser.add_argument("--keys", type=int, default=0, help="MSE part: keys per estimate")
    args = parser.parse_args()
    main(quick=args.quick, budget=args.budget, parts=tuple(args.parts.split(",")),
         only=args.only, keys=args.keys)
