import jax


# Tests compare against float64 references; float32 is exercised explicitly.
jax.config.update("jax_enable_x64", True)
# Catch silent broadcasting bugs.
jax.config.update("jax_numpy_rank_promotion", "raise")
