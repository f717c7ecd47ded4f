"""The matching example runs end to end and learns."""

import importlib.util
import pathlib


def _load_example():
    path = pathlib.Path(__file__).parents[1] / "examples" / "matching.py"
    spec = importlib.util.spec_from_file_location("example_matching", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matching_example_quick(tmp_path):
    out = _load_example().main(quick=True, outdir=str(tmp_path))
    assert pathlib.Path(out["plot"]).is_file()
    # A random scorer puts about 1/n = 1/6 of the items in their slot; training on
    # 120 batches must at least double that on held-out instances.
    assert out["initial_accuracy"] < 0.35
    assert out["final_accuracy"] > 0.5
    assert out["final_accuracy"] > out["initial_accuracy"] + 0.2
    assert out["losses"][-1] < out["losses"][0]
