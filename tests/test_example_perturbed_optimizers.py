import pathlib
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

import perturbed_optimizers  # noqa: E402


def test_example_runs_and_matches_the_notebook(tmp_path):
    out = perturbed_optimizers.main(quick=True, outdir=str(tmp_path))
    p = out["softmax"]
    # 20,000 samples in quick mode: within 5 standard errors of the softmax
    assert np.all(np.abs(out["pert_argmax"] - p) < 5 * np.sqrt(p * (1 - p) / 20_000) + 1e-6)
    # gradient descent drives the perturbed one-hot towards its target
    assert np.abs(out["final_one_hot"] - out["target_one_hot"]).max() < 0.05
    assert (tmp_path / "perturbed_optimizers.png").stat().st_size > 10_000
