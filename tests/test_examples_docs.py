"""The examples run, every code block of the docs runs, and the API pages are complete.

Conventions for ```python blocks in docs/*.md: each block is a self-contained script,
run in a fresh namespace in the order of the page, with JAX's default configuration
(float32). An HTML comment on the line just above a block changes that:

- `<!-- docs-test: continue -->`: run in the namespace of the previous block;
- `<!-- docs-test: skip -->`: do not run (say why in the text);
- `<!-- docs-test: needs=MODULE -->`: run only if MODULE can be imported (optional
  dependencies such as OR-Tools or jaxopt).

Blocks that only embed a file with `--8<--` (the examples) are skipped here: the
examples are run by `test_example` below.
"""

import ast
import contextlib
import importlib.util
import pathlib
import re
import types

import jax
import pytest

import structpert


ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLES = ROOT / "examples"

_FENCE = re.compile(
    r"(?:^<!--[ \t]*docs-test:[ \t]*(?P<marker>[^>\n]*?)[ \t]*-->[ \t]*\n)?"
    r"^```python[^\n]*\n(?P<code>.*?)^```\s*$",
    re.MULTILINE | re.DOTALL,
)


@contextlib.contextmanager
def _fast_compile():
    """Skip most XLA optimisations while compiling. These tests run many small
    programs once each, so compile time dominates; this roughly halves it and changes
    nothing but speed (and float rounding order)."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


def _user_config(rank_promotion="raise"):
    """Run code in float32, JAX's default (conftest enables x64). Our examples keep
    `jax_numpy_rank_promotion="raise"`; docs blocks run with JAX's default ("allow"),
    as a user's session would (third-party code such as jaxopt needs it)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.enable_x64(False))
    stack.enter_context(jax.numpy_rank_promotion(rank_promotion))
    stack.enter_context(_fast_compile())
    return stack


# ---------------------------------------------------------------------------------
# Examples: main(quick=True, outdir=tmp_path) returns metrics; check them.


def _load_example(name):
    path = EXAMPLES / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_ranking(m):
    # InferOpt's pass bar for ranking pipelines: final error below 0.75x the initial.
    assert m["final_test_error"] < 0.75 * m["initial_test_error"]
    assert m["losses"][-1] < m["losses"][0]


def _check_topk(m):
    assert m["final_test_regret"] < 0.5 * m["initial_test_regret"]
    assert m["final_precision"] > m["initial_precision"] + 0.3


def _check_custom_solver(m):
    assert m["final_test_iou"] > 0.6
    assert m["final_test_iou"] > 2 * m["initial_test_iou"]


def _check_knapsack_milp(m):
    assert m["final_test_regret"] < 0.5 * m["initial_test_regret"]
    # One scipy host call per jitted training step, for the whole batch x samples.
    assert m["host_calls_per_step"] == 1


def _check_warcraft(m):
    assert m["final_test_cost_ratio"] < m["initial_test_cost_ratio"]
    assert m["final_test_cost_ratio"] < 1.5


EXAMPLE_CHECKS = {
    "ranking": _check_ranking,
    "topk": _check_topk,
    "custom_solver": _check_custom_solver,
    "knapsack_milp": _check_knapsack_milp,
    "warcraft": _check_warcraft,
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_CHECKS))
def test_example(name, tmp_path):
    if not (EXAMPLES / f"{name}.py").exists():
        pytest.skip(f"examples/{name}.py is not written yet")
    module = _load_example(name)
    assert module.__doc__ and f"python examples/{name}.py" in module.__doc__
    with _user_config():
        metrics = module.main(quick=True, outdir=str(tmp_path))
    EXAMPLE_CHECKS[name](metrics)
    assert list(tmp_path.glob("*.png")), "the example should save a plot"


# ---------------------------------------------------------------------------------
# Docs code blocks.


def _pages():
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


def _blocks(page):
    text = (DOCS / page).read_text()
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        yield match.group("marker") or "", match.group("code"), line


@pytest.mark.parametrize("page", _pages())
def test_docs_code_blocks_run(page, capsys):
    namespace: dict = {}
    ran = 0
    for marker, code, line in _blocks(page):
        if code.lstrip().startswith("--8<--"):
            continue  # an embedded example, run by test_example
        if marker == "skip":
            continue
        if marker.startswith("needs="):
            module = marker.removeprefix("needs=").strip()
            if importlib.util.find_spec(module) is None:
                continue
        elif marker not in ("", "continue"):
            pytest.fail(f"{page}:{line}: unknown docs-test marker {marker!r}")
        if marker != "continue":
            namespace = {"__name__": f"docs_{ran}"}
        try:
            with _user_config(rank_promotion="allow"):
                exec(compile(code, f"{page}:{line}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the code block at docs/{page}:{line} failed") from error
        ran += 1
    capsys.readouterr()  # the blocks print; keep the test output quiet


def test_docs_blocks_are_found():
    blocks = [b for page in _pages() for b in _blocks(page)]
    assert len(blocks) >= 10
    assert any("--8<--" in code for _, code, _ in blocks)


# ---------------------------------------------------------------------------------
# API coverage: every public name has a `:::` block (or is listed in one).


def _directives():
    """{identifier: the names listed in its `members:` option} over all API pages.

    `members: false` gives an empty list; `members: true` (everything) gives None.
    """
    found: dict[str, list[str] | None] = {}
    for page in sorted((DOCS / "api").glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("::: "):
                continue
            members: list[str] | None = []
            in_list = False
            for follow in lines[i + 1 :]:
                if follow.strip() and not follow.startswith(" "):
                    break
                item = follow.strip()
                if item.startswith("members:"):
                    value = item.removeprefix("members:").strip()
                    members = None if value == "true" else []
                    in_list = value == ""
                elif in_list and item.startswith("- ") and members is not None:
                    members.append(item[2:].strip())
                elif item:
                    in_list = False
            found[line[4:].strip()] = members
    return found


def _module_exports(module: types.ModuleType) -> list[str]:
    """Public names of a module: `__all__`, or its own top-level definitions plus
    its `from x import y as y` re-exports (the convention pyright follows)."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    assert module.__file__ is not None
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.ImportFrom):
            names += [a.asname for a in node.names if a.asname and a.asname == a.name]
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return [n for n in names if not n.startswith("_")]


def _api_text():
    return "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))


def test_every_public_name_is_in_the_api_reference():
    directives = _directives()
    text = _api_text()
    public = set(_module_exports(structpert))
    # Also anything else public in dir(structpert) that structpert defines (the
    # jaxtyping import hook adds its own helpers, which are not ours).
    for name in dir(structpert):
        obj = getattr(structpert, name)
        origin = getattr(obj, "__name__" if isinstance(obj, types.ModuleType) else "__module__", "")
        if not name.startswith("_") and str(origin).startswith("structpert"):
            public.add(name)
    top_level_objects = {id(getattr(structpert, n)) for n in public}
    missing = []
    for name in sorted(public):
        obj = getattr(structpert, name)
        dotted = f"structpert.{name}"
        if not isinstance(obj, types.ModuleType):
            if dotted not in directives:
                missing.append(dotted)
            continue
        # A public submodule: a `:::` block for it, and each of its public names
        # rendered there (in `members:`) or on its own, or, if it is an alias of a
        # top-level name (e.g. perturbations.Gumbel), at least mentioned.
        members = directives.get(dotted)
        if dotted not in directives:
            missing.append(dotted)
            members = []
        for sub in _module_exports(obj):
            full = f"{dotted}.{sub}"
            if full in directives or members is None or sub in members:
                continue
            if id(getattr(obj, sub)) in top_level_objects and f"`{full}`" in text:
                continue
            missing.append(full)
    assert not missing, (
        f"public names missing from docs/api/*.md: {missing}. Add a `::: name` block "
        "with an explicit `members:` option."
    )


def test_api_directives_name_real_objects_and_members():
    for identifier, members in _directives().items():
        parts = identifier.split(".")
        obj = importlib.import_module(parts[0])
        for part in parts[1:]:
            obj = getattr(obj, part)
        for member in members or []:
            assert hasattr(obj, member), f"{identifier} has no member {member}"
    # Every `:::` block states its members (force_inspection renders everything
    # otherwise, including equinox internals).
    for page in sorted((DOCS / "api").glob("*.md")):
        text = page.read_text()
        count = text.count("\n::: ") + text.startswith("::: ")
        assert text.count("members:") == count, f"{page.name}: a ::: block lacks members:"


def test_public_methods_are_listed_in_members():
    """New public methods or properties of public classes must be listed, unless
    they implement a method declared (and documented) by a base class."""
    directives = _directives()
    missing = []
    for name in _module_exports(structpert):
        cls = getattr(structpert, name)
        if not isinstance(cls, type):
            continue
        members = directives.get(f"structpert.{name}") or []
        for attr, value in vars(cls).items():
            if attr.startswith("_") and attr != "__call__":
                continue
            if not (callable(value) or isinstance(value, property)):
                continue
            if any(hasattr(base, attr) for base in cls.__mro__[1:]):
                continue  # implements a documented method of a base class
            if attr not in members:
                missing.append(f"structpert.{name}.{attr}")
    assert not missing, f"public methods missing from the API pages' members: {missing}"


def test_home_page_shows_the_readme_quick_example():
    readme = (ROOT / "README.md").read_text()
    first = _FENCE.search(readme)
    assert first is not None, "README.md should start with a ```python quick example"
    assert first.group("code") in (DOCS / "index.md").read_text(), (
        "docs/index.md should show README.md's quick example verbatim; copy it over"
    )


def test_every_example_is_embedded_in_the_docs():
    pages = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    missing = [
        script.name
        for script in sorted(EXAMPLES.glob("*.py"))
        if f'--8<-- "examples/{script.name}"' not in pages
    ]
    assert not missing, f"embed these examples in a docs page (and mkdocs.yml): {missing}"
