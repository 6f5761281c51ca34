"""Training configs (ml_collections). Importable as `vt_jax.configs`."""
