"""Hand-written kernels behind model interfaces, each with an XLA fallback (see the modules)."""
