"""The jaxopt-compatible front end, and the seed notebook run on it."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import mc_tol

from structpert import perturbations


NOTEBOOK = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "seed" / "perturbed_optimizers.ipynb"
)


def argmax_one_hot(x, axis=-1):
    return jax.nn.one_hot(jnp.argmax(x, axis=axis), x.shape[axis])


def test_perturbed_argmax_softmax_and_signature():
    values = jnp.array([1.2, -0.4, 0.3, 0.9])
    sigma, m = 0.4, 50_000
    f = perturbations.make_perturbed_argmax(argmax_one_hot, num_samples=m, sigma=sigma)
    y = f(values, jax.random.PRNGKey(0))  # raw uint32 keys, as jaxopt users pass
    p = np.asarray(jax.nn.softmax(values / sigma))
    np.testing.assert_array_less(np.abs(np.asarray(y) - p), mc_tol(np.sqrt(p * (1 - p)), m))


def test_integer_valued_solver_and_control_variate():
    ranking = lambda v: jnp.argsort(jnp.argsort(v))  # returns integers, as in the notebook
    values = jnp.array([0.3, -0.2, 0.9, 0.1])
    for cv in [False, True]:
        f = perturbations.make_perturbed_argmax(
            ranking, num_samples=64, sigma=0.2, noise=perturbations.Normal(), control_variate=cv
        )
        y = f(values, jax.random.PRNGKey(1))
        assert y.dtype == values.dtype
        g = jax.grad(lambda v: jnp.sum(f(v, jax.random.PRNGKey(1)) ** 2))(values)
        assert g.shape == values.shape and bool(jnp.all(jnp.isfinite(g)))


def test_perturbed_max_gradient_is_perturbed_argmax():
    values = jnp.array([0.5, -1.0, 0.25])
    fmax = perturbations.make_perturbed_max(argmax_one_hot, num_samples=20_000, sigma=0.5)
    fargmax = perturbations.make_perturbed_argmax(argmax_one_hot, num_samples=20_000, sigma=0.5)
    key = jax.random.PRNGKey(3)
    np.testing.assert_allclose(jax.grad(fmax)(values, key), fargmax(values, key), rtol=1e-6)
    exact = 0.5 * jax.nn.logsumexp(values / 0.5) + 0.5 * np.euler_gamma
    gumbel_std = 0.5 * math.pi / math.sqrt(6)
    assert abs(float(fmax(values, key)) - float(exact)) < mc_tol(gumbel_std, 20_000)


def test_perturbed_fun_of_any_shape():
    # E[relu(x + sigma Z)] with Normal noise has the closed form
    # sigma * phi(x / sigma) + x * Phi(x / sigma).
    from scipy.stats import norm

    x = jnp.array([0.3, -0.5, 1.0])
    sigma, m = 0.5, 50_000
    f = perturbations.make_perturbed_fun(
        jax.nn.relu, num_samples=m, sigma=sigma, noise=perturbations.Normal()
    )
    y = f(x, jax.random.PRNGKey(0))
    u = np.asarray(x) / sigma
    exact = sigma * norm.pdf(u) + np.asarray(x) * norm.cdf(u)
    np.testing.assert_array_less(np.abs(np.asarray(y) - exact), mc_tol(1.0, m))
    # a scalar-valued function
    total = perturbations.make_perturbed_fun(lambda v: jnp.sum(jax.nn.relu(v)), num_samples=m,
                                             sigma=sigma, noise=perturbations.Normal())
    s = total(x, jax.random.PRNGKey(0))
    assert s.shape == ()
    g = jax.grad(total)(x, jax.random.PRNGKey(0))  # d/dx = Phi(x / sigma)
    np.testing.assert_array_less(np.abs(np.asarray(g) - norm.cdf(u)), mc_tol(4.0, m))


def test_jaxopt_style_noise_objects_are_accepted():
    class LegacyNormal:  # a jaxopt-style distribution: sample(seed, sample_shape), log_prob
        def sample(self, seed, sample_shape):
            return jax.random.normal(seed, sample_shape)

        def log_prob(self, inputs):
            return -0.5 * inputs**2

    values = jnp.array([0.2, 0.4, -0.1])
    f_old = perturbations.make_perturbed_argmax(argmax_one_hot, 32, 0.3, noise=LegacyNormal())
    normal = perturbations.Normal()
    f_new = perturbations.make_perturbed_argmax(argmax_one_hot, 32, 0.3, noise=normal)
    key = jax.random.PRNGKey(0)
    jac_old = jax.jacrev(f_old)(values, key)
    jac_new = jax.jacrev(f_new)(values, key)
    np.testing.assert_allclose(jac_old, jac_new, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="noise"):
        perturbations.make_perturbed_argmax(argmax_one_hot, noise="gumbel")


def _notebook_code():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = []
    for cell in cells:
        src = "".join(cell["source"])
        if cell["cell_type"] != "code" or src.startswith("%") or "colab" in src:
            continue  # pip magics and the Colab TPU cell
        src = src.replace("from jaxopt import", "from structpert import")
        # `import jaxopt` is unused by the notebook's code; structpert does not need it.
        code.append(src.replace("import jaxopt\n", ""))
    return "\n".join(code)


@pytest.mark.skipif(not NOTEBOOK.exists(), reason="the seed notebook is not beside this checkout")
def test_seed_notebook_runs_with_only_its_import_changed():
    code = _notebook_code()
    assert "from structpert import perturbations" in code and "jaxopt" not in code
    ns: dict = {"print": lambda *a, **k: None}
    exec(compile(code, str(NOTEBOOK), "exec"), ns)
    # one-hot: 100,000 samples against the softmax, as the notebook prints
    p = np.asarray(ns["soft_max"])
    err = np.abs(np.asarray(ns["pert_argmax"]) - p)
    np.testing.assert_array_less(err, mc_tol(np.sqrt(p * (1 - p)), 100_000))  # the first N_SAMPLES
    # ranking: the notebook's gradient-descent loop reaches low loss; the notebook ends
    # at the target ranks. Check the descent made progress from the notebook's 28.9.
    final = float(ns["loss_example"](ns["values_t"], ns["rngs"][1]))
    initial = float(ns["loss_example"](ns["values"], ns["rngs"][1]))
    assert final < 0.5 * initial
    np.testing.assert_array_equal(np.asarray(ns["y_true"]), np.arange(6))
