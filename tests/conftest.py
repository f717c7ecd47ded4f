import os


# Four host (CPU) devices for the multi-device tests (tests/test_sharding.py). XLA reads
# the flag when JAX starts its backend, i.e. at the first computation, after this file.
# Computations that ask for no devices still run on device 0 alone, as with one device.
_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=4".strip()

import jax  # noqa: E402


# Tests compare against float64 references; float32 is exercised explicitly.
jax.config.update("jax_enable_x64", True)
# Catch silent broadcasting bugs.
jax.config.update("jax_numpy_rank_promotion", "raise")
