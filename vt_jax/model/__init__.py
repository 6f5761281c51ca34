"""Qwen2.5-VL in Flax NNX: config, model, HF import/export, sharding, chunked log-probs."""
from vt_jax.model.config import (ConfigError, ModelConfig, NotQwen25VLError, PRESETS, TextConfig, VisionConfig,
                                 get_config, load_config, save_config)
