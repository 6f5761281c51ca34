"""Tiny random transformers Qwen2.5-VL models and prompts for the parity tests (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from vt_jax.model import config as C

TINY = C.PRESETS["tiny"]


def hf_config(config: C.ModelConfig = TINY, *, tie: bool | None = None) -> Qwen2_5_VLConfig:
  t, v = config.text, config.vision
  tie = t.tie_word_embeddings if tie is None else tie
  return Qwen2_5_VLConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                       num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                       num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
                       rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
                       rope_scaling={"type": "mrope", "mrope_section": list(t.mrope_section)},
                       bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_ids[0],
                       pad_token_id=config.pad_token_id, tie_word_embeddings=tie),
      vision_config=dict(depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                         num_heads=v.num_heads, fullatt_block_indexes=list(v.fullatt_block_indexes),
                         window_size=v.window_size, out_hidden_size=v.out_hidden_size,
                         tokens_per_second=int(v.tokens_per_second), spatial_merge_size=v.spatial_merge_size,
                         patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size),
      image_token_id=config.image_token_id, video_token_id=config.video_token_id,
      vision_start_token_id=config.vision_start_token_id, vision_end_token_id=config.vision_end_token_id,
      tie_word_embeddings=tie)


def make_hf_model(path, config: C.ModelConfig = TINY, *, tie: bool | None = None, seed: int = 0):
  """A random HF model saved to `path`. Norm weights and biases are randomised too (HF's init leaves them at
  1 / 0), so a mix-up of any tensor shows in the logits."""
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(config, tie=tie)).eval()
  model.config._attn_implementation = "eager"
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.05 * torch.randn_like(p))
  model.save_pretrained(path)
  return model


def prompt(items, rng: np.random.Generator, config: C.ModelConfig = TINY):
  """Token ids for a sequence of ("text", n) / ("image", grid) / ("video", grid) items; vision items are
  wrapped in <|vision_start|> ... <|vision_end|>. Returns (ids [L], image grids, video grids)."""
  ids, images, videos = [], [], []
  for kind, arg in items:
    if kind == "text":
      ids += rng.integers(0, 900, size=arg).tolist()
      continue
    t, h, w = arg
    pad = config.image_token_id if kind == "image" else config.video_token_id
    ids += [config.vision_start_token_id] + [pad] * (t * h * w // 4) + [config.vision_end_token_id]
    (images if kind == "image" else videos).append(arg)
  return np.array(ids, np.int64), images, videos


def pixels(grids, rng: np.random.Generator, patch_dim: int = 1176):
  n = sum(t * h * w for t, h, w in grids)
  return rng.standard_normal((n, patch_dim)).astype(np.float32) if grids else None


def hf_logits(model, input_ids, attention_mask, positions, pixel_values=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None):
  """HF forward with OUR 3D position ids (transformers 5.x would otherwise use its own rope semantics)."""
  t = lambda x, dt=None: None if x is None else torch.as_tensor(np.asarray(x), dtype=dt)
  ids = torch.as_tensor(input_ids)
  types = torch.zeros_like(ids)
  types[ids == model.config.image_token_id] = 1
  types[ids == model.config.video_token_id] = 2
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=t(attention_mask, torch.long), position_ids=t(positions, torch.long),
                pixel_values=t(pixel_values), image_grid_thw=t(image_grid_thw, torch.long),
                pixel_values_videos=t(pixel_values_videos), video_grid_thw=t(video_grid_thw, torch.long),
                second_per_grid_ts=t(second_per_grid_ts, torch.float32), mm_token_type_ids=types)
  return out.logits.numpy()
