"""Config dataclasses, presets and the hub config.json in both directions (and transformers reading ours)."""
import dataclasses
import json

import pytest
from transformers import AutoConfig, Qwen2_5_VLConfig

from vt_jax.model import config as C


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_preset_round_trips_through_flat_config_json(name, tmp_path):
  cfg = C.get_config(name)
  C.save_config(cfg, tmp_path)
  raw = json.loads((tmp_path / "config.json").read_text())
  assert "text_config" not in raw and raw["model_type"] == "qwen2_5_vl"  # flat, hub style
  assert C.load_config(tmp_path) == cfg
  hf = AutoConfig.from_pretrained(tmp_path)  # transformers 5.x reads the flat form
  assert isinstance(hf, Qwen2_5_VLConfig)
  assert hf.text_config.hidden_size == cfg.text.hidden_size
  assert hf.text_config.num_key_value_heads == cfg.text.num_key_value_heads
  assert hf.text_config.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
  assert hf.vision_config.fullatt_block_indexes == list(cfg.vision.fullatt_block_indexes)
  assert hf.vision_config.hidden_size == cfg.vision.hidden_size
  assert hf.tie_word_embeddings == cfg.text.tie_word_embeddings
  assert hf.video_token_id == cfg.video_token_id


def test_released_sizes():
  assert C.PRESETS["3b"].text.tie_word_embeddings and C.PRESETS["3b"].text.vocab_size == 151936
  assert C.PRESETS["72b"].text.num_hidden_layers == 80 and C.PRESETS["72b"].vision.out_hidden_size == 8192
  for name in ("3b", "7b", "32b", "72b"):
    assert C.PRESETS[name].text.head_dim == 128 and C.PRESETS[name].vision.head_dim == 80
  assert C.PRESETS["tiny"].vision.window_patches == 16 and C.PRESETS["7b"].vision.window_patches == 64


def test_reads_nested_transformers5_config(tmp_path):
  ids = C.TINY_TOKEN_IDS
  hf = Qwen2_5_VLConfig(
      text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       bos_token_id=ids["bos_token_id"],
                       eos_token_id=ids["eos_token_ids"][0], pad_token_id=ids["pad_token_id"],
                       rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rms_norm_eps=1e-6),
      vision_config=dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, fullatt_block_indexes=[1, 3],
                         window_size=56, out_hidden_size=64, tokens_per_second=2),
      image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
      vision_start_token_id=ids["vision_start_token_id"], vision_end_token_id=ids["vision_end_token_id"])
  hf.save_pretrained(tmp_path)
  cfg = C.load_config(tmp_path)
  tiny = C.PRESETS["tiny"]
  assert cfg.text == tiny.text and cfg.vision == tiny.vision
  assert cfg.image_token_id == tiny.image_token_id and cfg.eos_token_ids[0] == tiny.eos_token_ids[0]


def test_clear_errors(tmp_path):
  with pytest.raises(C.NotQwen25VLError, match="no config.json"):
    C.load_config(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
  with pytest.raises(C.NotQwen25VLError, match="model_type='llama'"):
    C.load_config(tmp_path)
  good = C.PRESETS["tiny"].to_hf_dict()
  bad = dict(good, num_attention_heads=3)
  with pytest.raises(C.ConfigError, match="hidden_size=64 is not divisible by num_attention_heads=3"):
    C.ModelConfig.from_hf_dict(bad, source="x/config.json")
  bad = dict(good, rope_scaling={"type": "mrope", "mrope_section": [4, 3, 3]})
  with pytest.raises(C.ConfigError, match=r"x/config.json: rope_scaling.mrope_section=\[4, 3, 3\]"):
    C.ModelConfig.from_hf_dict(bad, source="x/config.json")
  bad = dict(good, vision_config=dict(good["vision_config"], out_hidden_size=32))
  with pytest.raises(C.ConfigError, match="out_hidden_size=32 must equal"):
    C.ModelConfig.from_hf_dict(bad)
  bad = dict(good, vision_config=dict(good["vision_config"], fullatt_block_indexes=[1, 9]))
  with pytest.raises(C.ConfigError, match=r"fullatt_block_indexes \[9\] out of range"):
    C.ModelConfig.from_hf_dict(bad)
  bad = dict(good, num_hidden_layers=None)
  with pytest.raises(C.ConfigError, match="missing field num_hidden_layers"):
    C.ModelConfig.from_hf_dict(bad)
  with pytest.raises(C.ConfigError, match="video_token_id=151656 is outside the vocabulary"):
    dataclasses.replace(C.PRESETS["tiny"], video_token_id=151656).validate()
  with pytest.raises(C.ConfigError, match="unknown model preset"):
    C.get_config("13b")
