"""`model.text_fields` / `model.vision_fields`: preset fields changed from the config, checked by name."""

import pytest

from vt_jax.configs import base
from vt_jax.train import sft


def _config(**text):
  c = base.base_config()
  c.model.preset = "tiny"
  c.model.text_fields.update(text)
  return c


def test_fields_replace_the_preset():
  c = _config(rope_theta=10000.0)
  c.model.vision_fields.intermediate_size = 96
  c.model.vocab_size = 1024
  mc = sft.resolve_model_config(c)
  assert mc.text.rope_theta == 10000.0 and mc.text.vocab_size == 1024 and mc.vision.intermediate_size == 96
  assert sft.resolve_model_config(_config()).text.rope_theta != 10000.0  # the preset's own value


def test_unknown_field_is_named():
  with pytest.raises(ValueError, match="rope_base"):
    sft.resolve_model_config(_config(rope_base=1.0))


def test_hf_dir_refuses_field_overrides(tmp_path):
  c = _config(rope_theta=10000.0)
  c.model.hf_dir = str(tmp_path)
  with pytest.raises(ValueError, match="text_fields"):
    sft.resolve_model_config(c)
