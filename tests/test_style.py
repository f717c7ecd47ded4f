"""Every public Equinox module is abstract (and named so) or final."""

import inspect

import equinox as eqx

import structpert as sp


def _public_modules():
    for name in dir(sp):
        obj = getattr(sp, name)
        if inspect.isclass(obj) and issubclass(obj, eqx.Module):
            yield name, obj


def _is_abstract(cls):
    return bool(getattr(cls, "__abstractmethods__", ())) or any(
        True for _ in getattr(cls, "__abstractvars__", ())
    ) or any(True for _ in getattr(cls, "__abstractclassvars__", ()))


def test_abstract_or_final():
    modules = dict(_public_modules())
    assert {"AbstractSolver", "AbstractNoise", "PerturbedOptimizer", "Simplex"} <= set(modules)
    for name, cls in modules.items():
        if name.startswith("Abstract"):
            assert _is_abstract(cls), f"{name} is named Abstract but has nothing abstract"
        else:
            assert not _is_abstract(cls), f"{name} is concrete by name but abstract"
            for other_name, other in modules.items():
                if other is not cls:
                    assert not issubclass(other, cls), f"{other_name} subclasses final {name}"


def test_only_abstract_methods_are_overridden():
    for name, cls in _public_modules():
        for base in cls.__mro__[1:]:
            if not (isinstance(base, type) and issubclass(base, eqx.Module)):
                continue
            if base is eqx.Module or base.__module__.startswith("equinox"):
                continue
            for attr, value in vars(cls).items():
                if attr.startswith("__") or attr not in vars(base):
                    continue
                parent = vars(base)[attr]
                if callable(parent):
                    assert getattr(parent, "__isabstractmethod__", False), (
                        f"{name}.{attr} overrides concrete {base.__name__}.{attr}"
                    )


def test_public_names_have_docstrings():
    for name in dir(sp):
        if name.startswith("_"):
            continue
        obj = getattr(sp, name)
        if callable(obj):
            assert inspect.getdoc(obj), f"structpert.{name} has no docstring"


def test_no_control_characters_in_strings():
    """A LaTeX command in a non-raw docstring needs a doubled backslash: `\\theta`
    written with one becomes a tab and `\\varepsilon` a vertical tab, which the API
    pages render as broken maths."""
    import ast
    import pathlib

    bad = {"\t", "\v", "\b", "\f", "\a"}
    root = pathlib.Path(sp.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if bad & set(node.value):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"control characters in string literals at {found}"
