"""HF import/export: identical tensors both ways, transformers loads our export with the same logits, the
convert CLI, and the named errors (not a Qwen2.5-VL dir, missing / mis-shaped tensors, token counts)."""
import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from vt_jax import convert
from vt_jax.model import hf_io
from vt_jax.model.config import NotQwen25VLError
from vt_jax.model.positions import VisionTokenMismatch

from tests.model.hf_tiny import TINY, hf_logits, make_hf_model, pixels, prompt


def _tensors(path):
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(path, f), "np") as h:
        out.update({k: h.get_tensor(k) for k in h.keys()})
  return out


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tied" if request.param else "hf")
  make_hf_model(path, tie=request.param, seed=int(request.param))
  (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
  (path / "chat_template.jinja").write_text("{{ messages }}")
  return path


def _sample_inputs():
  rng = np.random.default_rng(0)
  ids, images, videos = prompt([("text", 4), ("video", (2, 4, 6)), ("text", 3), ("image", (1, 4, 4)),
                                ("text", 2)], rng)
  return ids[None], np.ones((1, ids.size), np.int64), pixels(images, rng), images, pixels(videos, rng), videos


def test_round_trip_identical_tensors_and_transformers_logits(hf_dir, tmp_path):
  model = hf_io.from_pretrained(hf_dir, dtype=jnp.float32)
  # A tiny shard limit forces several shards + index; the re-import below reads that sharded form.
  files = hf_io.save_pretrained(model, tmp_path / "out", dtype="float32", max_shard_size="40KB",
                                tokenizer_dir=hf_dir)
  out = tmp_path / "out"
  assert len(files) > 1 and (out / hf_io.INDEX_NAME).exists()
  index = json.loads((out / hf_io.INDEX_NAME).read_text())
  assert sorted(set(index["weight_map"].values())) == sorted(files)
  assert (out / "chat_template.jinja").read_text() == "{{ messages }}"
  assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"
  assert "text_config" not in json.loads((out / "config.json").read_text())
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == list(
      model.config.eos_token_ids)

  original, exported = _tensors(hf_dir), _tensors(out)
  if model.config.text.tie_word_embeddings:
    assert "lm_head.weight" not in exported  # tied: the hub stores only the embedding
    original.pop("lm_head.weight", None)
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name], err_msg=name)

  # transformers loads the export and gives the same logits as the original (and as ours).
  ids, mask, px_i, images, px_v, videos = _sample_inputs()
  positions = hf_io.build_model_inputs(TINY, ids, mask, px_i, images, px_v, videos, [1.0])["positions"]
  reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
  want = hf_logits(reference, ids, mask, positions, px_i, images, px_v, videos, [1.0])
  got = hf_logits(reloaded, ids, mask, positions, px_i, images, px_v, videos, [1.0])
  np.testing.assert_array_equal(got, want)
  ours = hf_io.forward_hf(hf_io.from_pretrained(out, dtype=jnp.float32), ids, mask, px_i, images, px_v, videos,
                          [1.0])
  assert np.abs(ours - want).max() <= 1e-4


def test_bf16_export_and_bf16_import(hf_dir, tmp_path):
  model = hf_io.from_pretrained(hf_dir, param_dtype=jnp.bfloat16)
  assert model.text.embed_tokens[...].dtype == jnp.bfloat16
  hf_io.save_pretrained(model, tmp_path)
  with safe_open(str(tmp_path / hf_io.SINGLE_NAME), "np") as h:
    name = "model.layers.0.self_attn.q_proj.weight"
    assert h.get_slice(name).get_dtype() == "BF16"
    expected = _tensors(hf_dir)[name].astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(h.get_tensor(name), expected)
  # A bf16 checkpoint (as released) imports into fp32 master weights exactly.
  fp32 = hf_io.from_pretrained(tmp_path, param_dtype=jnp.float32)
  np.testing.assert_array_equal(fp32.text.layers.q_proj.kernel[...][0], expected.astype(np.float32).T)


def test_convert_cli_both_ways(hf_dir, tmp_path):
  assert convert.main(["import", "--hf_dir", str(hf_dir), "--out", str(tmp_path / "native")]) == 0
  assert (tmp_path / "native" / "params").is_dir()
  assert convert.main(["export", "--src", str(tmp_path / "native"), "--out", str(tmp_path / "hf"),
                       "--dtype", "float32", "--tokenizer_dir", str(hf_dir)]) == 0
  original, exported = _tensors(hf_dir), _tensors(tmp_path / "hf")
  for name in exported:
    np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
  assert (tmp_path / "hf" / "tokenizer_config.json").exists()


def test_not_a_qwen_dir(tmp_path):
  with pytest.raises(NotQwen25VLError, match="no config.json"):
    hf_io.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
  with pytest.raises(NotQwen25VLError, match="not a Qwen2.5-VL checkpoint"):
    hf_io.from_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
  with pytest.raises(NotQwen25VLError, match="no \\*.safetensors files"):
    hf_io.from_pretrained(tmp_path)


def test_missing_and_mismatched_tensors_are_named(hf_dir, tmp_path):
  tensors = load_file(str(hf_dir / hf_io.SINGLE_NAME))
  (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
  broken = dict(tensors)
  del broken["model.layers.1.mlp.up_proj.weight"]
  broken["visual.blocks.2.attn.qkv.bias"] = np.zeros(5, np.float32)
  broken["model.extra.weight"] = np.zeros(3, np.float32)
  save_file(broken, str(tmp_path / hf_io.SINGLE_NAME))
  with pytest.raises(hf_io.CheckpointError) as err:
    hf_io.from_pretrained(tmp_path)
  msg = str(err.value)
  assert "missing tensors (1): model.layers.1.mlp.up_proj.weight" in msg
  assert "visual.blocks.2.attn.qkv.bias: checkpoint (5,), config expects (192,)" in msg
  assert "unexpected tensors (1): model.extra.weight" in msg
  # strict=False ignores the extra tensor but never a missing one.
  with pytest.raises(hf_io.CheckpointError, match="missing tensors"):
    hf_io.from_pretrained(tmp_path, strict=False)


def test_vision_token_count_mismatch(hf_dir):
  model = hf_io.from_pretrained(hf_dir, dtype=jnp.float32)
  ids, mask, px_i, images, px_v, videos = _sample_inputs()
  short = ids[:, np.r_[0:8, 9:ids.shape[1]]]  # drop one <|video_pad|>
  with pytest.raises(VisionTokenMismatch):
    hf_io.forward_hf(model, short, mask[:, 1:], px_i, images, px_v, videos, [1.0])
  with pytest.raises(VisionTokenMismatch, match="video pixel values have shape"):
    hf_io.forward_hf(model, ids, mask, px_i, images, px_v[:-4], videos, [1.0])
  with pytest.raises(VisionTokenMismatch, match="only 0 image grids"):
    hf_io.forward_hf(model, ids, mask, None, None, px_v, videos, [1.0])
