"""Model behaviour beyond HF parity: packed segments are isolated, padding gives no NaN, remat policies
give the same gradients, and the bf16 dtype policy stays close to fp32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.model import config as C
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.modeling import Qwen25VL

from tests.model.hf_tiny import TINY, pixels, prompt

VISION = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids", "vision_token_index")


@nnx.jit
def _forward(model, batch):
  return model(batch["input_ids"], batch["positions"], batch["segment_ids"],
               **{k: batch[k] for k in VISION if k in batch})


def _run(model, batch):
  return _forward(model, {k: jnp.asarray(v) for k, v in batch.items() if k != "next_position"})


def _run_eager(model, batch):
  return model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]),
               **{k: jnp.asarray(batch[k]) for k in VISION if k in batch})


def test_packed_samples_do_not_see_each_other():
  model = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32)
  rng = np.random.default_rng(0)
  a_ids, _, a_vid = prompt([("text", 3), ("video", (2, 4, 4)), ("text", 4)], rng)
  b_ids, b_img, _ = prompt([("image", (1, 4, 6)), ("text", 5)], rng)
  px_a, px_b = pixels(a_vid, rng), pixels(b_img, rng)
  a = build_model_inputs(TINY, a_ids[None], None, None, None, px_a, a_vid, [1.0])
  b = build_model_inputs(TINY, b_ids[None], None, px_b, b_img)
  separate = [np.asarray(_run(model, a))[0], np.asarray(_run(model, b))[0]]
  # Pack both into one row with one vision buffer; positions restart per sample.
  packed = build_model_inputs(TINY, np.concatenate([a_ids, b_ids])[None], None, px_b, b_img, px_a, a_vid, [1.0])
  packed["positions"] = np.concatenate([a["positions"], b["positions"]], axis=2)
  packed["segment_ids"] = np.concatenate([np.full(a_ids.size, 1), np.full(b_ids.size, 2)])[None].astype(np.int32)
  out = np.asarray(_run(model, packed))[0]
  np.testing.assert_allclose(out[:a_ids.size], separate[0], atol=1e-5)
  np.testing.assert_allclose(out[a_ids.size:], separate[1], atol=1e-5)


def test_padding_rows_are_finite():
  model = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32)
  ids = jnp.zeros((2, 8), jnp.int32)
  seg = jnp.array([[1] * 5 + [0] * 3, [0] * 8], jnp.int32)  # second row is all padding
  out = model(ids, jnp.zeros((3, 2, 8), jnp.int32), seg)
  assert bool(jnp.isfinite(out).all())


def test_remat_policies_give_the_same_gradients():
  rng = np.random.default_rng(1)
  ids, _, vid = prompt([("text", 3), ("video", (2, 4, 4)), ("text", 3)], rng)
  batch = {k: jnp.asarray(v) for k, v in
           build_model_inputs(TINY, ids[None], None, None, None, pixels(vid, rng), vid, [1.0]).items()}

  def loss(model):
    logits = _run_eager(model, batch)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  grads = {}  # "dots" / "dots_no_batch" go through the same jax.checkpoint path with another policy
  for policy in ("none", "full"):
    model = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32, remat=policy)
    grads[policy] = nnx.to_flat_state(nnx.state(nnx.grad(loss)(model), nnx.Param))
  for policy in ("full",):
    for (path, g0), (_, g1) in zip(grads["none"], grads[policy]):
      np.testing.assert_allclose(g1[...], g0[...], atol=1e-6, err_msg=f"{policy} {path}")
  with pytest.raises(ValueError, match="remat='sometimes'"):
    _run_eager(Qwen25VL(TINY, rngs=nnx.Rngs(0), remat="sometimes"), batch)


def test_dtype_policy():
  rng = np.random.default_rng(2)
  ids, img, _ = prompt([("text", 3), ("image", (1, 4, 4)), ("text", 5)], rng)
  batch = build_model_inputs(TINY, ids[None], None, pixels(img, rng), img)
  f32 = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32)
  train = Qwen25VL(TINY, rngs=nnx.Rngs(0))  # fp32 params, bf16 compute (the default)
  infer = Qwen25VL(TINY, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
  # bf16 init draws other random numbers: give it f32's weights, rounded to bf16.
  nnx.update(infer, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(f32, nnx.Param)))
  assert train.text.layers.q_proj.kernel[...].dtype == jnp.float32
  assert infer.text.layers.q_proj.kernel[...].dtype == jnp.bfloat16
  want = np.asarray(_run(f32, batch))
  for model in (train, infer):
    out = _run(model, batch)
    assert out.dtype == jnp.float32  # logits always fp32
    assert np.abs(np.asarray(out) - want).max() < 0.05 * np.abs(want).max()
  hidden = train(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]), return_hidden=True)
  assert hidden.dtype == jnp.bfloat16 and hidden.shape == (1, ids.size, TINY.text.hidden_size)


def test_vision_buffer_must_be_window_multiple():
  model = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32)
  with pytest.raises(ValueError, match="not a multiple of window_patches=16"):
    model.encode_vision(jnp.zeros((1, 20, 1176)), jnp.zeros((1, 20, 2), jnp.int32), jnp.zeros((1, 20), jnp.int32),
                        jnp.zeros((1, 20), jnp.int32))
  with pytest.raises(C.ConfigError, match="not divisible by num_attention_heads=3"):
    Qwen25VL(C.ModelConfig(text=C.TextConfig(hidden_size=64, num_attention_heads=3)), rngs=nnx.Rngs(0))
