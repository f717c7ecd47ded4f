"""structpert.datasets (PyEPO's generator, arcs, split, Warcraft-like maps) and
structpert.metrics (regret, cost ratio, exact match)."""

import importlib.util

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from structpert import datasets, metrics


BAD_INPUT = (ValueError, TypeError, jaxtyping.TypeCheckError)


def test_shortest_path_data_matches_pyepo_check_value():
    # YARDSTICKS.md: genData(2000, 5, (5, 5), deg=4, noise_width=0.5, seed=42)
    x, c = datasets.shortest_path_data(2000, 5, (5, 5), deg=4, noise_width=0.5, seed=42)
    assert x.shape == (2000, 5) and x.dtype == np.float64
    assert c.shape == (2000, 40) and c.dtype == np.float32
    expected = np.array([0.3539176, 1.0785899, 1.0139644, 0.6649363, 0.29919598], np.float32)
    np.testing.assert_array_equal(c[0, :5], expected)


def test_shortest_path_data_follows_the_formula():
    # An independent transcription of the generator, one sample at a time (the loop
    # of older PyEPO versions draws the noise in the same order).
    n, p, grid, deg, e, seed = 7, 3, (3, 4), 2, 0.3, 5
    rnd = np.random.RandomState(seed)
    d = 17
    b = rnd.binomial(1, 0.5, (d, p))
    x = rnd.normal(0, 1, (n, p))
    c = np.zeros((n, d))
    for i in range(n):
        ci = ((b @ x[i]) / np.sqrt(p) + 3) ** deg + 1
        c[i] = ci / 3.5**deg * rnd.uniform(1 - e, 1 + e, d)
    x2, c2 = datasets.shortest_path_data(n, p, grid, deg=deg, noise_width=e, seed=seed)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_allclose(c2, c, rtol=1e-6)
    # noise_width 0: no noise, costs are a deterministic function of the features
    _, c0 = datasets.shortest_path_data(4, 2, (2, 2), deg=1, seed=0)
    x0 = np.random.RandomState(0)
    b0 = x0.binomial(1, 0.5, (4, 2))
    np.testing.assert_allclose(
        c0, ((x0.normal(0, 1, (4, 2)) @ b0.T / np.sqrt(2) + 3) + 1) / 3.5, rtol=1e-6
    )


def test_grid_arcs_in_pyepo_order():
    np.testing.assert_array_equal(
        datasets.grid_arcs((2, 3)), [[0, 1], [1, 2], [0, 3], [1, 4], [2, 5], [3, 4], [4, 5]]
    )
    arcs = datasets.grid_arcs((5, 5))
    assert arcs.shape == (40, 2)
    np.testing.assert_array_equal(
        arcs[:9], [[0, 1], [1, 2], [2, 3], [3, 4], [0, 5], [1, 6], [2, 7], [3, 8], [4, 9]]
    )
    step = arcs[:, 1] - arcs[:, 0]
    assert set(step.tolist()) == {1, 5}  # right or down: a DAG
    assert len({tuple(a) for a in arcs.tolist()}) == 40
    assert datasets.grid_arcs((1, 3)).tolist() == [[0, 1], [1, 2]]


def test_train_test_indices_is_one_permutation():
    train, test = datasets.train_test_indices(2000, 1000, seed=42)
    perm = np.random.RandomState(42).permutation(2000)
    np.testing.assert_array_equal(test, perm[:1000])
    np.testing.assert_array_equal(train, perm[1000:])
    train, test = datasets.train_test_indices(10, 0.25, seed=0)
    assert len(test) == 3 and len(train) == 7
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(10))


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")
def test_train_test_indices_matches_sklearn():
    from sklearn.model_selection import train_test_split

    x = np.arange(2000)
    for size, seed in [(1000, 42), (0.3, 0)]:
        tr, te = train_test_split(x, test_size=size, random_state=seed)
        train, test = datasets.train_test_indices(2000, size, seed)
        np.testing.assert_array_equal(x[train], tr)
        np.testing.assert_array_equal(x[test], te)


def test_warcraft_maps():
    maps = datasets.warcraft_maps(20, (12, 12), seed=1)
    assert maps.shape == (20, 12, 12) and maps.dtype == np.float32
    levels = np.array(datasets.WARCRAFT_COSTS, np.float32)
    assert set(np.unique(maps).tolist()) == set(levels.tolist())
    np.testing.assert_array_equal(maps, datasets.warcraft_maps(20, (12, 12), seed=1))
    assert not np.array_equal(maps, datasets.warcraft_maps(20, (12, 12), seed=2))
    # every terrain type covers about a fifth of each map (quantile cuts)
    counts = np.stack([(maps == v).sum(axis=(1, 2)) for v in levels])
    assert counts.min() >= 20 and counts.max() <= 40

    def same_as_right_neighbour(m):
        return np.mean(m[:, :, 1:] == m[:, :, :-1])

    # patches: neighbours share a type far more often than for independent cells
    rough = datasets.warcraft_maps(20, (12, 12), smoothness=0.0, seed=1)
    assert same_as_right_neighbour(maps) > 0.45 > 0.3 > same_as_right_neighbour(rough)
    custom = datasets.warcraft_maps(3, (30, 20), costs=(1.0, 2.0), seed=0)
    assert custom.shape == (3, 30, 20) and set(np.unique(custom).tolist()) == {1.0, 2.0}
    assert datasets.warcraft_maps(2, (2, 2)).shape == (2, 2, 2)


def test_dataset_errors():
    bad_calls = [
        lambda: datasets.grid_arcs((5,)),  # pyright: ignore[reportArgumentType]
        lambda: datasets.grid_arcs((1, 1)),
        lambda: datasets.grid_arcs((2.5, 3)),  # pyright: ignore[reportArgumentType]
        lambda: datasets.shortest_path_data(0),
        lambda: datasets.shortest_path_data(10, deg=0),
        lambda: datasets.shortest_path_data(10, noise_width=-0.1),
        lambda: datasets.train_test_indices(10, 10, 0),
        lambda: datasets.train_test_indices(10, 1.5, 0),
        lambda: datasets.train_test_indices(10, True, 0),
        lambda: datasets.warcraft_maps(2, (5, 5), costs=(1.0, -1.0)),
        lambda: datasets.warcraft_maps(2, (5, 5), smoothness=-1.0),
    ]
    for call in bad_calls:
        with pytest.raises(BAD_INPUT):
            call()


def test_metrics_by_hand():
    costs = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 1.0]])
    y_opt = np.array([[1, 1, 0], [0, 0, 1]])  # optimal costs 3 and 1
    y_pred = np.array([[0, 1, 1], [0, 0, 1]])  # costs 5 and 1
    assert float(metrics.normalized_regret(costs, y_pred, y_opt)) == pytest.approx(2 / 4)
    assert float(metrics.cost_ratio(costs, y_pred, y_opt)) == pytest.approx((5 / 3 + 1) / 2)
    assert float(metrics.exact_match(y_pred, y_opt)) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.objective(costs, y_pred), [5.0, 1.0])
    assert float(metrics.normalized_regret(costs, y_opt, y_opt)) == 0.0
    assert float(metrics.exact_match(y_opt.astype(bool), y_opt.astype(np.float32))) == 1.0


def test_metrics_on_grids_and_under_jit():
    costs = jnp.arange(1.0, 19.0).reshape(2, 3, 3)
    y = jnp.zeros((2, 3, 3)).at[:, 0, 0].set(1).at[:, 2, 2].set(1)
    y_other = y.at[1, 1, 1].set(1)
    regret = jax.jit(metrics.normalized_regret)(costs, y_other, y)
    assert float(regret) == pytest.approx(14.0 / (10.0 + 28.0))
    assert float(jax.jit(metrics.exact_match)(y_other, y)) == 0.5


def test_metric_errors():
    with pytest.raises(BAD_INPUT):
        metrics.normalized_regret(np.ones((2, 3)), np.ones((2, 4)), np.ones((2, 3)))
    with pytest.raises(BAD_INPUT):
        metrics.exact_match(np.ones((2, 3)), np.ones((3, 2)))
