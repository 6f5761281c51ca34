"""Logits parity with transformers' Qwen2_5_VLForConditionalGeneration on tiny random models (fp32, CPU).

We pass our own 3D position ids to HF (original Qwen semantics; rope-index semantics are tested in
test_positions_layout.py). Max abs differences are printed (`pytest -s`) and must be <= 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vt_jax.model import hf_io
from vt_jax.model import vision_layout as VL
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.layers import mrope_cos_sin

from tests.model.hf_tiny import TINY, hf_logits, make_hf_model, pixels, prompt

TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tiny")
  hf = make_hf_model(path)
  ours = hf_io.from_pretrained(path, dtype=jnp.float32)
  return hf, ours


def _compare(models, rows, name, second_per_grid=None, pad_left=False):
  """rows: list of prompt item lists, one per batch row (right-padded, or left-padded with pad_left)."""
  hf, ours = models
  rng = np.random.default_rng(len(name))
  built = [prompt(items, rng) for items in rows]
  length = max(len(ids) for ids, _, _ in built)
  input_ids = np.full((len(rows), length), TINY.pad_token_id, np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  images, videos = [], []
  for b, (ids, im, vid) in enumerate(built):
    sl = slice(length - len(ids), length) if pad_left else slice(0, len(ids))
    input_ids[b, sl], mask[b, sl] = ids, 1
    images += im
    videos += vid
  px_img, px_vid = pixels(images, rng), pixels(videos, rng)
  spg = second_per_grid if second_per_grid is not None else ([1.0] * len(videos) or None)
  batch = build_model_inputs(TINY, input_ids, mask, px_img, images or None, px_vid, videos or None, spg)
  ours_logits = hf_io.forward_hf(ours, input_ids, mask, px_img, images or None, px_vid, videos or None, spg)
  theirs = hf_logits(hf, input_ids, mask, batch["positions"], px_img, images or None, px_vid, videos or None, spg)
  real = mask.astype(bool)
  diff = float(np.abs(ours_logits[real] - theirs[real]).max())
  print(f"\n[parity] {name}: max |logits diff| = {diff:.3g} over {int(real.sum())} tokens "
        f"(logit scale {float(np.abs(theirs[real]).max()):.3g})")
  assert diff <= TOL, (name, diff)
  return diff


def test_text_only(models):
  _compare(models, [[("text", 24)]], "text only")


def test_one_image(models):
  _compare(models, [[("text", 5), ("image", (1, 6, 10)), ("text", 7)]], "one image")


def test_multi_group_video_not_window_multiple(models):
  # 3 temporal groups, merged grid 3 x 5 (windows are 2 x 2 merged tokens): edge windows are partial.
  _compare(models, [[("text", 4), ("video", (3, 6, 10)), ("text", 6)]], "multi-group video", [0.5])


def test_two_videos_and_an_image_in_one_row(models):
  _compare(models, [[("text", 3), ("video", (2, 4, 6)), ("text", 2), ("image", (1, 6, 4)), ("video", (4, 6, 6)),
                     ("text", 5)]], "two videos + image", [1.0, 2.0])


@pytest.mark.parametrize("pad_left", [False, True])
def test_batch_of_two_rows_with_padding(models, pad_left):
  _compare(models, [[("text", 3), ("video", (2, 6, 6)), ("text", 4)], [("image", (1, 4, 8)), ("text", 3)]],
           f"batch of two, {'left' if pad_left else 'right'} padding", [1.0], pad_left=pad_left)


def test_vision_tower_alone(models):
  hf, ours = models
  rng = np.random.default_rng(7)
  grids = [(2, 6, 10), (1, 4, 4), (4, 8, 6)]
  px = pixels(grids, rng)
  with torch.no_grad():
    theirs = hf.model.visual(torch.as_tensor(px), grid_thw=torch.tensor(grids)).pooler_output.numpy()
  lay = VL.build_vision_layout(grids, window_size=TINY.vision.window_size, capacity=None)
  lay = VL.build_vision_layout(grids, window_size=TINY.vision.window_size, capacity=lay.capacity + 32)  # + padding
  out = ours.encode_vision(jnp.asarray(VL.gather_patches(px, lay))[None], jnp.asarray(lay.pos_hw)[None],
                           jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])[0]
  mine = np.asarray(out)[np.concatenate(lay.merged_index)]
  diff = float(np.abs(mine - theirs).max())
  print(f"\n[parity] vision tower alone: max |diff| = {diff:.3g} ({theirs.shape[0]} merged tokens)")
  assert mine.shape == theirs.shape and diff <= TOL


def test_one_decoder_layer_alone(models):
  hf, ours = models
  rng = np.random.default_rng(3)
  b, l, d = 2, 12, TINY.text.hidden_size
  x = rng.standard_normal((b, l, d)).astype(np.float32)
  positions = np.stack([np.arange(l), np.arange(l) // 2, np.arange(l) % 3])[:, None].repeat(b, 1)  # distinct t/h/w
  layer_t = hf.model.language_model.layers[0]
  with torch.no_grad():
    cos, sin = hf.model.language_model.rotary_emb(torch.as_tensor(x), torch.as_tensor(positions))
    causal = torch.full((l, l), float("-inf")).triu(1)[None, None].expand(b, 1, l, l)
    theirs = layer_t(torch.as_tensor(x), attention_mask=causal, position_embeddings=(cos, sin)).numpy()
  graphdef, state = nnx.split(ours.text.layers)
  layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
  cos_j, sin_j = mrope_cos_sin(jnp.asarray(positions), TINY.text.head_dim, TINY.text.rope_theta,
                               TINY.text.mrope_section)
  mine = np.asarray(layer(jnp.asarray(x), cos_j, sin_j, jnp.ones((b, l), jnp.int32)))
  diff = float(np.abs(mine - theirs).max())
  print(f"\n[parity] one decoder layer: max |diff| = {diff:.3g}")
  assert diff <= TOL
