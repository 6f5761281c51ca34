"""Qwen2.5-VL in Flax NNX: config, model, HF import/export, sharding, chunked log-probs."""
from vt_jax.model.attention import attention
from vt_jax.model.config import (ConfigError, ModelConfig, NotQwen25VLError, PRESETS, TextConfig, VisionConfig,
                                 get_config, load_config, save_config)
from vt_jax.model.hf_io import CheckpointError, forward_hf, from_pretrained, save_pretrained
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.logprobs import token_logprobs
from vt_jax.model.modeling import Qwen25VL
from vt_jax.model.positions import VisionTokenMismatch, get_rope_index, mrope_positions
from vt_jax.model.sharding import LOGICAL_RULES, create_model, logical_to_spec, make_mesh
from vt_jax.model.text import KVCache
