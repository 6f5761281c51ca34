"""vt_jax: Video-Thinker in JAX/Flax NNX."""
