"""KV-cache prefill + decode: greedy tokens equal transformers' greedy `generate`, and decode equals a full
forward over the same tokens."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vt_jax.model import hf_io, text as text_module
from vt_jax.model.inputs import build_model_inputs

from tests.model.hf_tiny import TINY, make_hf_model, pixels, prompt

NEW_TOKENS = 24
VISION_KEYS = ("pixel_values", "vision_pos_hw", "vision_window_ids", "vision_group_ids", "vision_token_index")
traces = {"prefill": 0, "decode": 0}


@nnx.jit
def _prefill(model, cache, batch):
  traces["prefill"] += 1  # runs at trace time only
  return model.prefill(cache, batch["input_ids"], batch["positions"], batch["segment_ids"],
                       **{k: batch[k] for k in VISION_KEYS if k in batch})


@nnx.jit
def _decode(model, cache, tokens):
  traces["decode"] += 1
  return model.decode_step(cache, tokens)


def greedy(model, batch, new_tokens, prefill=_prefill, decode=_decode):
  """Right-padded prompts -> [B, new_tokens] greedy tokens via prefill + decode_step."""
  b, length = batch["input_ids"].shape
  cache = model.init_cache(b, length + new_tokens, dtype=jnp.float32)
  logits, cache = prefill(model, cache, batch)
  out = []
  for _ in range(new_tokens):
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    out.append(token)
    logits, cache = decode(model, cache, token)
  return np.stack([np.asarray(t) for t in out], axis=1), cache


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_gen")
  hf = make_hf_model(path, seed=5)
  return hf, hf_io.from_pretrained(path, dtype=jnp.float32)


def _prompts(rng):
  # Video with 2 temporal groups (t ids 0, 2) over a 3 x 3 merged grid and an image: transformers 5.x and
  # the original rope semantics agree here, so HF generate's own positions match ours.
  rows = [[("text", 4), ("video", (2, 6, 6)), ("text", 5)], [("text", 2), ("image", (1, 4, 6)), ("text", 3)]]
  built = [prompt(r, rng) for r in rows]
  length = max(len(i) for i, _, _ in built)
  right = np.full((2, length), TINY.pad_token_id, np.int64)
  left = right.copy()
  mask_r, mask_l = np.zeros_like(right), np.zeros_like(right)
  for b, (ids, _, _) in enumerate(built):
    right[b, :len(ids)], mask_r[b, :len(ids)] = ids, 1
    left[b, length - len(ids):], mask_l[b, length - len(ids):] = ids, 1
  images = [g for _, im, _ in built for g in im]
  videos = [g for _, _, vid in built for g in vid]
  return right, mask_r, left, mask_l, images, videos


def test_greedy_matches_transformers_generate(models):
  hf, ours = models
  rng = np.random.default_rng(11)
  right, mask_r, left, mask_l, images, videos = _prompts(rng)
  px_i, px_v = pixels(images, rng), pixels(videos, rng)
  batch = build_model_inputs(TINY, right, mask_r, px_i, images, px_v, videos, [1.0])
  mine, cache = greedy(ours, {k: jnp.asarray(v) for k, v in batch.items()}, NEW_TOKENS)
  types = np.where(left == TINY.image_token_id, 1, np.where(left == TINY.video_token_id, 2, 0))
  with torch.no_grad():
    out = hf.generate(input_ids=torch.as_tensor(left), attention_mask=torch.as_tensor(mask_l),
                      pixel_values=torch.as_tensor(px_i), image_grid_thw=torch.tensor(images),
                      pixel_values_videos=torch.as_tensor(px_v), video_grid_thw=torch.tensor(videos),
                      second_per_grid_ts=torch.tensor([1.0]), mm_token_type_ids=torch.as_tensor(types),
                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
  theirs = out[:, left.shape[1]:].numpy()
  print(f"\n[generate] ours {mine.tolist()}\n[generate] hf   {theirs.tolist()}")
  np.testing.assert_array_equal(mine, theirs)
  assert traces["decode"] == 1 and traces["prefill"] == 1  # one compile per bucket
  # Decoded tokens continue at max prompt position + 1.
  np.testing.assert_array_equal(np.asarray(cache.next_position), batch["next_position"] + NEW_TOKENS)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_decode_equals_full_forward(models, monkeypatch, platform):
  """Logits of the cached decode == logits of one full forward over prompt + generated tokens, with the
  cache carried through the layer scan (CPU) and scanned in and out per layer (TPU / GPU)."""
  _, ours = models
  rng = np.random.default_rng(2)
  right, mask_r, _, _, images, videos = _prompts(rng)
  px_i, px_v = pixels(images, rng), pixels(videos, rng)
  batch = build_model_inputs(TINY, right, mask_r, px_i, images, px_v, videos, [1.0])
  monkeypatch.setattr(text_module, "current_platform", lambda: platform)
  # Fresh jits: the choice is made at trace time.
  prefill, decode = nnx.jit(_prefill.__wrapped__), nnx.jit(_decode.__wrapped__)
  gen, _ = greedy(ours, {k: jnp.asarray(v) for k, v in batch.items()}, 6, prefill, decode)
  lengths = mask_r.sum(1)
  b, length = right.shape
  full_ids = np.full((b, length + 6), TINY.pad_token_id, np.int64)
  full_pos = np.zeros((3, b, length + 6), np.int32)
  for r in range(b):
    n = lengths[r]
    full_ids[r, :n], full_ids[r, n:n + 6] = right[r, :n], gen[r]
    full_pos[:, r, :n] = batch["positions"][:, r, :n]
    full_pos[:, r, n:n + 6] = batch["next_position"][r] + np.arange(6)
  seg = (np.arange(length + 6)[None] < (lengths + 6)[:, None]).astype(np.int32)
  index = np.full((b, length + 6), -1, np.int32)
  for r in range(b):
    index[r, :lengths[r]] = batch["vision_token_index"][r, :lengths[r]]
  logits = np.asarray(ours(jnp.asarray(full_ids, jnp.int32), jnp.asarray(full_pos), jnp.asarray(seg),
                           pixel_values=jnp.asarray(batch["pixel_values"]),
                           vision_pos_hw=jnp.asarray(batch["vision_pos_hw"]),
                           vision_window_ids=jnp.asarray(batch["vision_window_ids"]),
                           vision_group_ids=jnp.asarray(batch["vision_group_ids"]),
                           vision_token_index=jnp.asarray(index)))
  for r in range(b):
    # The greedy token after position n-1+k is the argmax of the full forward there.
    picks = logits[r, lengths[r] - 1:lengths[r] + 5].argmax(-1)
    np.testing.assert_array_equal(picks, gen[r])


def test_prefill_self_attention_equals_attention_against_the_cache(models):
  """extend(empty=True) (a prefill: causal self-attention among the new tokens, here the CPU's blocked
  path at 200 tokens) gives the hidden states and cache of attending the whole empty cache."""
  _, ours = models
  text = ours.text
  b, t = 2, 200
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((b, t, TINY.text.hidden_size)), jnp.float32)
  valid = np.ones((b, t), bool)
  valid[1, 150:] = False  # a right-padded prompt
  positions = jnp.asarray(np.broadcast_to(np.arange(t), (3, b, t)), jnp.int32)
  cache = text.init_cache(b, t + 16, dtype=jnp.float32)
  run = lambda empty: nnx.jit(lambda m, c: m.extend(x, positions, jnp.asarray(valid), c, empty=empty))(text, cache)
  (h_self, c_self), (h_cache, c_cache) = run(True), run(False)
  np.testing.assert_allclose(np.asarray(h_self), np.asarray(h_cache), atol=2e-5)
  np.testing.assert_allclose(np.asarray(c_self.k), np.asarray(c_cache.k), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(c_self.valid), np.asarray(c_cache.valid))
  assert int(c_self.index) == t


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dtype,tie", [(jnp.float32, True), (jnp.bfloat16, True), (jnp.float32, False)])
def test_decode_weights_give_the_same_logits(dtype, tie, kernel, monkeypatch):
  """`decode_weights()` on CPU: the output table packed for the CPU kernel or, with the kernel off,
  a tied fp32 table as a `[D, V]` copy (XLA:CPU's faster decode layout, else None); the decoder layers as
  one param state per layer. Decode steps through them, on a per-layer cache (the layers unrolled), give
  the logits and cache of the stacked scan."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from vt_jax.kernels import cpu as cpu_kernels  # pylint: disable=import-outside-toplevel
  from vt_jax.model.modeling import Qwen25VL  # pylint: disable=import-outside-toplevel
  if not kernel:
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
  elif cpu_kernels.unavailable() is not None:
    pytest.skip(f"CPU kernel unavailable: {cpu_kernels.unavailable()}")
  config = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, tie_word_embeddings=tie))
  model = Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype)
  weights = model.decode_weights()
  d, v = config.text.hidden_size, config.text.vocab_size
  if kernel:
    pair = 2 if dtype == jnp.bfloat16 else 1
    assert weights.head is None and weights.packed_head.shape == (-(-v // 32), d // pair, 32, pair)
  elif tie and dtype == jnp.float32:
    assert weights.head.shape == (d, v)
    np.testing.assert_array_equal(np.asarray(weights.head), np.asarray(model.text.embed_tokens[...]).T)
  else:
    assert weights.head is None
  stacked = nnx.state(model.text.layers)
  assert len(weights.layers) == config.text.num_hidden_layers
  for i, layer in enumerate(weights.layers):
    jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(np.asarray(a), np.asarray(b[i])), layer, stacked)

  rng = np.random.default_rng(0)
  b, prompt_len, steps = 3, 5, 4
  ids = jnp.asarray(rng.integers(0, 900, (b, prompt_len)), jnp.int32)
  positions = jnp.asarray(np.broadcast_to(np.arange(prompt_len), (3, b, prompt_len)), jnp.int32)
  segments = jnp.asarray(np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]]), jnp.int32)
  cache = model.init_cache(b, prompt_len + steps)
  _, cache = nnx.jit(lambda m, c: m.prefill(c, ids, positions, segments))(model, cache)

  @nnx.jit
  def run(m, cache, weights):
    out = []
    tokens = jnp.asarray([3, 5, 7], jnp.int32)
    for _ in range(steps):  # the write index moves: every step updates another slot of each layer
      logits, cache = m.decode_step(cache, tokens, weights)
      out.append(logits)
      tokens = jnp.argmax(logits, -1).astype(jnp.int32)
    return jnp.stack(out), cache

  want, want_cache = run(model, cache, None)
  for name, w in (("decode weights", weights), ("sliced in the step", dataclasses.replace(weights, layers=None))):
    got, got_cache = run(model, cache.per_layer(), w)
    assert isinstance(got_cache.k, tuple), name
    tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the unrolled layers round apart in places
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol, err_msg=name)
    for got_kv, want_kv in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
      np.testing.assert_allclose(np.stack([np.asarray(a, np.float32) for a in got_kv]),
                                 np.asarray(want_kv, np.float32), rtol=tol, atol=tol, err_msg=name)
  if dtype == jnp.bfloat16:
    # Both bf16 paths slice the cache and weights through their bits (`layers.to_bits`): against the same
    # weights in fp32, where nothing is bit-cast, they agree to bf16 precision.
    fp32 = Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32)
    nnx.update(fp32, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model, nnx.Param)))
    cache32 = fp32.init_cache(b, prompt_len + steps)
    _, cache32 = nnx.jit(lambda m, c: m.prefill(c, ids, positions, segments))(fp32, cache32)
    ref, _ = run(fp32, cache32, None)
    np.testing.assert_allclose(np.asarray(want), np.asarray(ref), atol=0.05 * float(np.abs(ref).max()))
