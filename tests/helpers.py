"""Shared lists and utilities for the tests."""

import contextlib
import itertools
import re

import numpy as np
import pytest
from jaxtyping import TypeCheckError

import structpert as sp


NOISES = [sp.Gumbel(), sp.Normal()]
DTYPES = ["float32", "float64"]


def mc_tol(std, num_samples, z=5.0):
    """A tolerance of `z` standard errors for a Monte-Carlo mean of `num_samples` draws.

    With z = 5 a single fixed-key check fails with probability below 1e-6 per entry,
    so the tests never flake while still detecting any bias above the noise level.
    """
    return z * np.asarray(std) / np.sqrt(num_samples)


def brute_force_argmax(theta, candidates):
    """The best of an explicit list of candidate structures (first one wins ties)."""
    theta = np.asarray(theta, dtype=np.float64)
    scores = [float(np.sum(theta * c)) for c in candidates]
    return candidates[int(np.argmax(scores))], max(scores)


def permutations(n):
    return [np.array(p, dtype=float) for p in itertools.permutations(range(n))]


def k_hot(n, k):
    out = []
    for idx in itertools.combinations(range(n), k):
        v = np.zeros(n)
        v[list(idx)] = 1
        out.append(v)
    return out


BAD_INPUT = (ValueError, TypeError, TypeCheckError)


@contextlib.contextmanager
def bad_input(match):
    """Expect a clear error: ours (whose message must match `match`), or the
    jaxtyping hook's TypeCheckError when the annotations catch the input first."""
    with pytest.raises(BAD_INPUT) as info:
        yield
    if not isinstance(info.value, TypeCheckError):
        assert re.search(match, str(info.value)), str(info.value)
