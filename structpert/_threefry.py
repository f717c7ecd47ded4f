"""Threefry-2x32 random bits as one fused kernel, identical to JAX's own.

JAX's default key, `jax.random.key(seed)`, uses the Threefry-2x32 counter-based hash
(Salmon et al., 2011, "Parallel random numbers: as easy as 1, 2, 3"). Under JAX's
default `jax_threefry_partitionable = True`, entry `j` (row-major) of
`jax.random.bits(key, shape)` is `a ^ b`, where `(a, b)` is the hash of the 64-bit
counter `j` (as the pair hi, lo) under the key's two 32-bit words.

On the CPU, JAX compiles that hash as a loop of 5 steps over whole arrays (to keep
compilation short), so each of its 20 rounds reads and writes the full arrays from
memory. Drawing the layer's noise is then often slower than a cheap solver. Here the
same 20 rounds are written out as plain integer array code, which XLA fuses into one
pass over the counters that keeps everything in registers.

`fast_threefry_key(key)` returns the key rewrapped with that implementation; the
samplers of `jax.random` called with it (`normal`, `gumbel`, `uniform`, `split`,
`fold_in`, ...) then return exactly the values they return for `key`, in less time.
The test suite checks the equality bit for bit. Keys of other implementations, and
Threefry keys under `jax_threefry_partitionable = False` (whose bits are laid out
differently), are returned unchanged.

`window_key` makes keys whose draws are a slice of samples of a larger draw (the
counters offset), so that a streamed computation can draw its noise chunk by chunk
and still get exactly the numbers of the whole draw.
"""

import functools
import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, PRNGKeyArray, UInt32


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}
# Up to this many entries the bits are written out once (see `_fused`). Above it,
# recomputing them where they are read was faster on a 2-core CPU: a batch of 16 or 32
# top-10 instances of 1000 x 100 samples, against 1 to 8 where writing them out was
# 15-28% faster per step.
_WRITE_ONCE_MAX_SIZE = 2**20


def _rotate_left(x: Array, r: int) -> Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(
    k0: UInt32[Array, ""], k1: UInt32[Array, ""], x0: UInt32[Array, "*s"], x1: UInt32[Array, "*s"]
) -> tuple[UInt32[Array, "*s"], UInt32[Array, "*s"]]:
    """The Threefry-2x32 hash with 20 rounds, unrolled: 5 groups of 4 rounds, each
    group followed by a key injection."""
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + ks[(group + 1) % 3]
        x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _flat_index(shape: tuple[int, ...]) -> Array:
    """The row-major index of every entry of `shape`, as uint32 (size < 2**32), built
    from one iota per axis so that XLA can partition it like any elementwise code."""
    if not shape:
        return jnp.zeros((), jnp.uint32)
    strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
    index = lax.broadcasted_iota(jnp.uint32, shape, 0) * np.uint32(strides[0])
    for axis in range(1, len(shape)):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(strides[axis])
    return index


def _threefry_key(data: Array) -> PRNGKeyArray:
    return jax.random.wrap_key_data(data, impl="threefry2x32")


def _random_bits(key: Array, bit_width: int, shape: tuple[int, ...]) -> Array:
    """JAX's partitionable Threefry bits (see the module docstring); fused on the CPU.
    Other platforms keep JAX's own code, which is not a loop there."""
    dtype = _UINT.get(bit_width, jnp.uint64)
    jax_bits = lambda k: jax.random.bits(_threefry_key(k), shape, dtype)
    if math.prod(shape) >= 2**32:  # the counters need their high word
        return jax_bits(key)
    fused = _fused(_flat_index(shape), bit_width)
    return lax.platform_dependent(key, cpu=fused, default=jax_bits)


def _fused(index: Array, bit_width: int):
    """key -> the bits of the counters `index` (uint32), fused."""

    def bits(key):
        hi, lo = threefry2x32(key[0], key[1], jnp.zeros_like(index), index)
        return _combine(hi, lo, bit_width)

    if index.size > _WRITE_ONCE_MAX_SIZE:
        return bits
    # XLA copies cheap integer code into every kernel that reads its result, and the
    # normal sampler reads its uniforms in three kernels: three hashes per entry.
    return lambda key: written_out(bits(key), key[0])


def written_out(x: Array, word: Array) -> Array:
    """x, computed in one pass and written out: the operand of a conditional, which is
    a kernel boundary, so XLA does not fuse the code that computes x into the kernels
    that read it. The predicate always holds (a 32-bit word has at most 32 set bits),
    which XLA does not know; `word` is any uint32 scalar computed at run time (a key
    word)."""
    return lax.cond(lax.population_count(word) <= 32, lambda x: x, jnp.zeros_like, x)


def _combine(hi: Array, lo: Array, bit_width: int) -> Array:
    """JAX's partitionable layout: the 64 bits, or the xor of the two words."""
    if bit_width == 64:
        return (hi.astype(jnp.uint64) << np.uint64(32)) | lo.astype(jnp.uint64)
    return (hi ^ lo).astype(_UINT[bit_width])


def _via_threefry(fn):
    """Key derivation (`split`, `fold_in`, seeding) is JAX's own Threefry code: it
    touches a few words only, and must give the same keys."""

    def derive(data, *args):
        return jax.random.key_data(fn(_threefry_key(data), *args))

    return derive


_FUSED_THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,),
    seed=lambda seed: jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
    split=_via_threefry(jax.random.split),
    random_bits=_random_bits,
    fold_in=_via_threefry(jax.random.fold_in),
    name="threefry2x32_fused",
    tag="fry_fused",
)


def is_partitionable_threefry(key: Array) -> bool:
    """Whether entry j of every `jax.random` draw with `key` depends only on the key
    and j: a typed Threefry key under partitionable Threefry (JAX's default)."""
    return (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        and bool(getattr(jax.config, "jax_threefry_partitionable", False))
    )


def fast_threefry_key(key: Array) -> Array:
    """`key` with fused Threefry bits when that gives the same numbers (see
    `is_partitionable_threefry`); otherwise `key` itself."""
    if is_partitionable_threefry(key):
        return jax.random.wrap_key_data(jax.random.key_data(key), impl=_FUSED_THREEFRY)
    return key


@functools.cache
def _window_impl(batch: int, total: int, window: int, size: int):
    """A key implementation for a window of a larger draw.

    A draw of shape `(batch, total, *event)` (`size` entries per event) with a
    partitionable Threefry key hashes the counter `(i * total + m) * size + j` for
    entry j of sample m of instance i. A key of this implementation has the data
    `(k0, k1, start)`; its draws of shape `(batch, window, *event)` hash the counters of
    samples `start` to `start + window - 1` of the larger draw, so they return exactly
    that slice of it. (A leading axis, as in `jax.random.gumbel(mode="high")`, counts
    whole larger draws.) Counters past sample `total` belong to the next instance; the
    caller masks them. Keys derived by `split` or `fold_in` keep the window.
    """
    per = batch * window * size

    def random_bits(key, bit_width, shape):
        n = math.prod(shape)
        if n % per or (n // per) * batch * (total + window) * size >= 2**32:
            raise ValueError(f"no window of {(batch, window, size)} in a draw of {shape}")
        part = (n // per, batch, window * size)
        index = lax.broadcasted_iota(jnp.uint32, part, 0) * np.uint32(batch * total * size)
        index = index + lax.broadcasted_iota(jnp.uint32, part, 1) * np.uint32(total * size)
        index = index + lax.broadcasted_iota(jnp.uint32, part, 2) + key[2] * np.uint32(size)
        index = index.reshape(shape)

        def jax_code(k):
            hi, lo = jex_random.threefry2x32_p.bind(k[0], k[1], jnp.zeros_like(index), index)
            return _combine(hi, lo, bit_width)

        return lax.platform_dependent(key, cpu=_fused(index, bit_width), default=jax_code)

    def keep_window(fn):
        def derive(data, *args):
            keys = _via_threefry(fn)(data[:2], *args)
            start = jnp.broadcast_to(data[2:], (*keys.shape[:-1], 1))
            return jnp.concatenate([keys, start], axis=-1)

        return derive

    def seed(_):
        raise TypeError("window keys are made with `window_key`, not seeded")

    return jex_random.define_prng_impl(
        key_shape=(3,),
        seed=seed,
        split=keep_window(jax.random.split),
        random_bits=random_bits,
        fold_in=keep_window(jax.random.fold_in),
        name=f"threefry2x32_window_{batch}_{total}_{window}_{size}",
        tag="fry_window",
    )


def window_key(
    key: Array, start: Array, batch: int, total: int, window: int, size: int
) -> Array:
    """A key whose draws of shape `(batch, window, *event)` are samples `start` to
    `start + window - 1` of the draw `(batch, total, *event)` with `key` (a
    partitionable Threefry key; see `_window_impl`)."""
    data = jnp.concatenate([jax.random.key_data(key), jnp.asarray(start, jnp.uint32)[None]])
    return jax.random.wrap_key_data(data, impl=_window_impl(batch, total, window, size))
