"""The fused Threefry bits give exactly JAX's numbers, and the layer uses them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import structpert as sp
from structpert._perturbed import _Config, _draw_noise
from structpert._threefry import fast_threefry_key, threefry2x32, window_key


KEYS = [jax.random.key(0), jax.random.key(2**31 + 12345), jax.random.fold_in(jax.random.key(3), 9)]
# the last one is above _WRITE_ONCE_MAX_SIZE (bits recomputed where they are read)
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1000, 37), (1025, 1024)]


def test_hash_matches_the_published_known_answers():
    """Threefry-2x32 with 20 rounds, the known-answer vectors of Salmon et al. (2011),
    as used by JAX's own tests."""
    cases = [
        ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ]
    for key, count, expected in cases:
        k0, k1 = (jnp.uint32(w) for w in key)
        out = threefry2x32(k0, k1, jnp.uint32(count[0]), jnp.uint32(count[1]))
        assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64"])
def test_bits_equal_jax_bits(shape, dtype):
    for key in KEYS:
        expected = jax.random.bits(key, shape, jnp.dtype(dtype))
        got = jax.jit(lambda k: jax.random.bits(fast_threefry_key(k), shape, jnp.dtype(dtype)))(key)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_samplers_equal_jax_samplers(dtype):
    dt = jnp.dtype(dtype)
    samplers = [
        lambda k: jax.random.normal(k, (50, 31), dt),
        lambda k: jax.random.gumbel(k, (50, 31), dt),
        lambda k: jax.random.gumbel(k, (50, 31), dt, mode="high"),
        lambda k: jax.random.uniform(k, (4, 5, 6), dt, -2.0, 3.0),
        lambda k: jax.random.logistic(k, (77,), dt),
        lambda k: jax.random.permutation(k, 40),
        lambda k: jax.random.randint(k, (33,), 0, 1000),
    ]
    for key in KEYS:
        for draw in samplers:
            np.testing.assert_array_equal(draw(fast_threefry_key(key)), draw(key))


def test_key_derivation_and_vmap_equal_jax():
    key = KEYS[1]
    fast = fast_threefry_key(key)
    data = jax.random.key_data
    for derive in (lambda k: jax.random.split(k, 5), lambda k: jax.random.fold_in(k, 11)):
        np.testing.assert_array_equal(data(derive(fast)), data(derive(key)))
    draw = lambda k: jax.random.normal(k, (6, 3))
    per_key = lambda k: jax.vmap(lambda i: draw(jax.random.fold_in(k, i)))(jnp.arange(4))
    np.testing.assert_array_equal(jax.jit(per_key)(fast), per_key(key))
    keys = jax.random.split(key, 3)
    np.testing.assert_array_equal(jax.vmap(draw)(fast_threefry_key(keys)), jax.vmap(draw)(keys))


def test_other_keys_are_left_alone():
    rbg = jax.random.key(0, impl="rbg")
    assert fast_threefry_key(rbg) is rbg
    raw = jax.random.PRNGKey(0)  # a uint32 array, not a typed key
    assert fast_threefry_key(raw) is raw
    key = jax.random.key(0)
    old = getattr(jax.config, "jax_threefry_partitionable")
    try:
        jax.config.update("jax_threefry_partitionable", False)
        assert fast_threefry_key(key) is key
    finally:
        jax.config.update("jax_threefry_partitionable", old)
    assert str(jax.random.key_impl(fast_threefry_key(key))) != "threefry2x32"


def test_huge_shapes_use_jax_code():
    """Above 2**32 entries the counters need their high word: JAX's own code, which on
    the CPU is a loop (lowered only, nothing is allocated)."""
    u32 = jnp.dtype("uint32")
    draw = lambda shape: lambda k: jax.random.bits(fast_threefry_key(k), shape, u32)
    huge = (2**17, 2**16)
    assert math.prod(huge) >= 2**32
    out = jax.eval_shape(draw(huge), KEYS[0])
    assert out.shape == huge and out.dtype == u32
    lowered = lambda shape: jax.jit(draw(shape)).lower(KEYS[0]).as_text()
    if jax.default_backend() == "cpu":
        assert "while" in lowered(huge)
        assert "while" not in lowered((2**16, 2**15))


@pytest.mark.parametrize("orthogonal", [False, True])
def test_layer_noise_equals_plain_jax_noise(monkeypatch, orthogonal):
    """`_draw_noise` gives the same array with and without the fused bits."""
    noise = sp.Normal() if orthogonal else sp.Gumbel()
    cfg = _Config(
        sp.Simplex(), noise, 8, 1, "additive", "leave_one_out", False, None, orthogonal=orthogonal
    )
    f32 = jnp.dtype("float32")
    fused = _draw_noise(cfg, KEYS[2], 3, (10,), f32)
    monkeypatch.setattr("structpert._perturbed.fast_threefry_key", lambda k: k)
    np.testing.assert_array_equal(_draw_noise(cfg, KEYS[2], 3, (10,), f32), fused)


def test_layer_compiles_without_a_random_number_loop():
    """On the CPU, JAX's Threefry is a 5-step loop over whole arrays; the layer's
    compiled step has no loop at all (the speed this buys is in
    benchmarks/estimators.py, not asserted here)."""
    opt = sp.PerturbedOptimizer(sp.Simplex(), sp.Gumbel(), 0.5, 100)
    theta = jnp.zeros((4, 10), jnp.float32)
    loss = lambda t, k: jnp.sum(opt(t, key=k) ** 2)
    step = jax.jit(jax.value_and_grad(loss)).lower(theta, jax.random.key(0))
    assert " while(" not in str(step.compile().as_text())
    plain = jax.jit(lambda k: jax.random.gumbel(k, (4, 100, 10))).lower(jax.random.key(0))
    if jax.default_backend() == "cpu":  # the check above is not vacuous
        assert " while(" in str(plain.compile().as_text())


@pytest.mark.parametrize("start", [0, 4, 6])
def test_window_keys_draw_slices_of_the_whole_draw(start):
    """A window key's draw of (batch, window, *event) is samples start..start+window-1
    of the whole (batch, total, *event) draw, for the normal and Gumbel samplers
    (whose high mode draws a leading axis of 2) and keys derived by split; samples
    past the end belong to the next instance (the caller masks them)."""
    batch, total, window, event = 3, 10, 4, (2, 2)
    f32 = jnp.dtype("float32")
    samplers = [
        lambda k, s: jax.random.normal(k, s, f32),
        lambda k, s: jax.random.gumbel(k, s, f32),
        lambda k, s: jax.random.gumbel(k, s, f32, mode="high"),
        lambda k, s: jax.random.normal(jax.random.split(k)[1], s, f32),
    ]
    for key in KEYS:
        for draw in samplers:
            whole = draw(key, (batch, total, *event))
            shape = (batch, window, *event)
            part = jax.jit(lambda k, s: draw(window_key(k, s, batch, total, window, 4), shape))(
                key, start
            )
            n = min(window, total - start)
            np.testing.assert_array_equal(part[:, :n], whole[:, start : start + n])
            if n < window:  # the next instance's first samples
                np.testing.assert_array_equal(part[:-1, n:], whole[1:, : window - n])
