"""KV-cache sampler: greedy equals the argmax of repeated full forwards, sampled tokens follow the filtered
distribution, group sharing equals repeated prompts, one compile per bucket, stream equals sample, and the
sharded sampler equals one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.kernels import cpu as cpu_kernels
from vt_jax.model import sharding as S
from vt_jax.model.config import PRESETS
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.modeling import Qwen25VL
from vt_jax.train import sampler as SM

TINY = PRESETS["tiny"]
PATCH_DIM = TINY.vision.patch_dim


def _ids(rng, items):
  """Token ids for ("text", n) / ("video", grid) / ("image", grid) items -> (ids, images, videos)."""
  ids, images, videos = [], [], []
  for kind, arg in items:
    if kind == "text":
      ids += rng.integers(0, 900, size=arg).tolist()
      continue
    t, h, w = arg
    pad = TINY.image_token_id if kind == "image" else TINY.video_token_id
    ids += [TINY.vision_start_token_id] + [pad] * (t * h * w // 4) + [TINY.vision_end_token_id]
    (images if kind == "image" else videos).append(arg)
  return ids, images, videos


def make_prompts(seed=0, rows=None, length=None):
  """Right-padded prompts with a video, an image and a text-only row (numpy dict)."""
  rng = np.random.default_rng(seed)
  rows = rows or [[("text", 3), ("video", (2, 4, 4)), ("text", 5)], [("text", 6)],
                  [("image", (1, 4, 4)), ("text", 4)]]
  built = [_ids(rng, r) for r in rows]
  length = length or max(len(i) for i, _, _ in built)
  ids = np.full((len(rows), length), TINY.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for b, (i, _, _) in enumerate(built):
    ids[b, :len(i)], mask[b, :len(i)] = i, 1
  images = [g for _, im, _ in built for g in im]
  videos = [g for _, _, v in built for g in v]
  px = lambda grids: (rng.standard_normal((sum(t * h * w for t, h, w in grids), PATCH_DIM)).astype(np.float32)
                      if grids else None)
  return build_model_inputs(TINY, ids, mask, px(images), images or None, px(videos), videos or None,
                            [0.5] * len(videos) if videos else None)


@pytest.fixture(scope="module")
def model():
  return Qwen25VL(TINY, rngs=nnx.Rngs(3), dtype=jnp.float32)


def _full_forward_greedy(model, batch, steps):
  """Reference: re-run the whole sequence (prompt + tokens so far) each step and take the argmax."""
  b, length = batch["input_ids"].shape
  lengths = batch["segment_ids"].sum(1)
  total = length + steps
  ids = np.full((b, total), TINY.pad_token_id, np.int32)
  pos = np.zeros((3, b, total), np.int32)
  index = np.full((b, total), -1, np.int32)
  for r in range(b):
    n = lengths[r]
    ids[r, :n], pos[:, r, :n] = batch["input_ids"][r, :n], batch["positions"][:, r, :n]
    index[r, :n] = batch["vision_token_index"][r, :n]
  out = np.zeros((b, steps), np.int32)
  forward = jax.jit(lambda i, p, s, x: model(i, p, s, pixel_values=batch["pixel_values"],
                                             vision_pos_hw=batch["vision_pos_hw"],
                                             vision_window_ids=batch["vision_window_ids"],
                                             vision_group_ids=batch["vision_group_ids"], vision_token_index=x))
  for k in range(steps):
    seg = (np.arange(total)[None] < (lengths + k)[:, None]).astype(np.int32)
    logits = np.asarray(forward(ids, pos, seg, index))
    for r in range(b):
      at = lengths[r] + k - 1
      out[r, k] = logits[r, at].argmax()
      ids[r, at + 1] = out[r, k]
      pos[:, r, at + 1] = batch["next_position"][r] + k
  return out


def test_greedy_equals_argmax_of_full_forwards(model):
  batch = make_prompts(0)
  steps = 6
  config = SM.SamplingConfig(temperature=0.0, max_new_tokens=steps, eos_ids=(TINY.eos_token_ids[0],),
                             pad_id=TINY.pad_token_id)
  out = SM.sample(model, batch, key=jax.random.key(0), config=config)
  ref = _full_forward_greedy(model, batch, steps)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  print(f"\n[sampler] greedy {tokens.tolist()}")
  assert tokens.shape == (3, steps)
  for r in range(3):
    np.testing.assert_array_equal(tokens[r, :lengths[r]], ref[r, :lengths[r]])
    assert lengths[r] == steps or tokens[r, lengths[r] - 1] == TINY.eos_token_ids[0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.6),
                                                     (0.8, 4, 0.9)])
def test_choose_tokens_follows_filtered_distribution(temperature, top_k, top_p):
  logits = jnp.asarray([2.0, 1.5, 1.0, 0.4, 0.0, -0.5, -1.0, -3.0], jnp.float32)
  n = 20000
  config = SM.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=1)
  tokens, logp = SM.choose_tokens(jnp.broadcast_to(logits, (n, 8)), SM.row_keys(jax.random.key(7), n), 0,
                                  config)
  # Independent numpy reference: temperature, keep the top_k, then the nucleus; renormalise.
  p = np.exp(np.asarray(logits) / temperature)
  p /= p.sum()
  keep = np.ones(8, bool)
  if top_k:
    keep[np.argsort(-p)[top_k:]] = False
  if top_p < 1.0:
    q = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
    order = np.argsort(-q)
    before = np.cumsum(q[order]) - q[order]
    keep[order[before >= top_p]] = False
  want = np.where(keep, p, 0) / np.where(keep, p, 0).sum()
  freq = np.bincount(np.asarray(tokens), minlength=8) / n
  assert freq[~keep].sum() == 0, freq
  tv = 0.5 * np.abs(freq - want).sum()
  assert tv < 0.015, (freq, want)
  np.testing.assert_allclose(np.asarray(logp), np.log(p)[np.asarray(tokens)], rtol=1e-5)


def _nucleus_size(logits, temperature, top_p):
  """Independent numpy nucleus size (sorted descending, keep while the mass before is below top_p)."""
  p = np.exp((logits - logits.max()) / temperature)
  p = np.sort(p / p.sum())[::-1]
  return int(np.sum(np.cumsum(p) - p < top_p))


def _nucleus_distribution(logits, size):
  """The renormalised nucleus of `size` tokens (descending, ties by id) in float64, and its member mask."""
  p = np.exp(logits.astype(np.float64) - logits.max())
  p /= p.sum()
  keep = np.zeros(len(p), bool)
  keep[np.argsort(-p, kind="stable")[:size]] = True
  return p, keep, np.where(keep, p, 0) / p[keep].sum()


def _check_draws(name, tokens, logp, logits, size):
  """Every token in the nucleus, log-probs untruncated, frequencies of the 8 most likely tokens and of the rest
  of the nucleus within 0.03 total variation of the renormalised nucleus."""
  p, keep, want_p = _nucleus_distribution(logits, size)
  assert keep[tokens].all(), name
  np.testing.assert_allclose(logp, np.log(p[tokens]), rtol=1e-4, atol=1e-5)
  top = np.argsort(-p, kind="stable")[:8]
  freq = np.append(np.bincount(tokens, minlength=len(p))[top] / len(tokens), 1 - np.isin(tokens, top).mean())
  ref = np.append(want_p[top], 1 - want_p[top].sum())
  print(f"\n[sampler] top-p {name}: nucleus {size}, TV {0.5 * np.abs(freq - ref).sum():.4f}")
  assert 0.5 * np.abs(freq - ref).sum() < 0.03, (name, freq, ref)


def test_top_p_candidates_and_threshold_follow_the_nucleus_per_row():
  """Top-p over the K most likely tokens (K = 16, then 256) or, for rows no K covers, over the nucleus found
  by threshold bisection: each follows the numpy nucleus distribution, the candidate levels draw the same token
  for the same key, and a row's token does not depend on the other rows of its batch."""
  vocab, n, temperature, top_p = 1000, 4000, 1.0, 0.9
  rng = np.random.default_rng(0)
  base = rng.standard_normal(vocab).astype(np.float32)
  cases = {  # name -> (logits, allowed nucleus sizes): each case needs a different level of the cascade
      "in top 16": (base + np.where(np.arange(vocab) % 97 < 1, 9.0, 0.0).astype(np.float32), (2, 16)),
      "in top 256": (base + np.where(np.arange(vocab) % 11 < 1, 6.0, 0.0).astype(np.float32), (17, 256)),
      "threshold": (base * 0.2, (257, vocab)),
  }
  fast = SM.SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=1, nucleus_candidates=(16, 256))
  threshold = SM.SamplingConfig(temperature=temperature, top_p=top_p, max_new_tokens=1, nucleus_candidates=())
  keys = SM.row_keys(jax.random.key(3), n)
  choose = jax.jit(SM.choose_tokens, static_argnames="config")
  u = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 0), (2,)))(keys)
  alone = {}
  for name, (logits, (lo, hi)) in cases.items():
    size = _nucleus_size(logits, temperature, top_p)
    assert lo <= size <= hi, (name, size)
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, vocab))
    got, logp = choose(batch, keys, 0, config=fast)
    alone[name] = np.asarray(got)
    # Which candidate sets cover top_p (the predicate of the cascade's conds), and each covering level's own
    # draw from its K candidates is the cascade's token.
    lse = jax.nn.logsumexp(batch / temperature, axis=-1)
    for k in (16, 256):
      cand, ids = jax.lax.top_k(batch / temperature, k)
      weights, covered = SM._nucleus(cand, lse, top_p)  # pylint: disable=protected-access
      assert bool(jnp.all(covered)) == (size <= k) and bool(jnp.any(covered)) == (size <= k), (name, k)
      if size <= k:
        direct = jnp.take_along_axis(ids, SM.sample_from_weights(weights, u)[:, None], axis=-1)[:, 0]
        np.testing.assert_array_equal(np.asarray(direct), alone[name], err_msg=(name, k))
    _check_draws(name, alone[name], np.asarray(logp), logits, size)
    by_threshold, logp = choose(batch, keys, 0, config=threshold)
    _check_draws(f"{name}, threshold only", np.asarray(by_threshold), np.asarray(logp), logits, size)
    if size > 256:
      np.testing.assert_array_equal(alone[name], np.asarray(by_threshold), err_msg=name)
  # Rows of all three kinds in one batch draw what they drew in a batch of their own kind.
  names = list(cases) * 3
  mixed = jnp.asarray(np.stack([cases[name][0] for name in names]))
  got, _ = choose(mixed, keys[:len(names)], 0, config=fast)
  np.testing.assert_array_equal(np.asarray(got), [alone[name][r] for r, name in enumerate(names)])


def test_top_p_threshold_breaks_ties_by_id():
  """A flat row (every token tied): the nucleus is the lowest ids holding top_p of the mass, drawn uniformly."""
  vocab, n = 1000, 20000
  config = SM.SamplingConfig(temperature=1.0, top_p=0.8995, max_new_tokens=1, nucleus_candidates=(16,))
  tokens, _ = SM.choose_tokens(jnp.zeros((n, vocab)), SM.row_keys(jax.random.key(5), n), 0, config)
  tokens = np.asarray(tokens)
  assert tokens.min() >= 0 and tokens.max() == 899, tokens.max()  # 900 x 0.001 is the first mass >= top_p
  freq = np.bincount(tokens // 90, minlength=10) / n
  assert 0.5 * np.abs(freq - 0.1).sum() < 0.02, freq


def test_sample_from_weights_two_levels():
  """The blocked inverse CDF (n > one block, not a multiple of it): frequencies match, zero weights are never
  drawn, and the extreme uniforms stay on positive-weight entries."""
  n_vocab, draws = 700, 20000
  weights = np.zeros(n_vocab, np.float32)
  heavy = np.array([0, 5, 127, 128, 300, 451, 640, 699])
  weights[heavy] = [0.2, 0.05, 0.1, 0.15, 0.05, 0.2, 0.1, 0.05]
  light = np.arange(130, 256, 3)  # the rest of the mass, spread thin inside one block; other entries stay 0
  weights[light] = 0.1 / len(light)
  u = jax.random.uniform(jax.random.key(0), (draws, 2))
  idx = np.asarray(SM.sample_from_weights(jnp.broadcast_to(jnp.asarray(weights), (draws, n_vocab)), u))
  assert (weights[idx] > 0).all()
  freq = np.append(np.bincount(idx, minlength=n_vocab)[heavy] / draws, np.isin(idx, light).mean())
  ref = np.append(weights[heavy], weights[light].sum()) / weights.sum()
  assert 0.5 * np.abs(freq - ref).sum() < 0.015, (freq, ref)
  edges = jnp.asarray([[0.0, 0.0], [np.nextafter(1, 0, dtype=np.float32)] * 2], jnp.float32)
  first_last = np.asarray(SM.sample_from_weights(jnp.broadcast_to(jnp.asarray(weights), (2, n_vocab)), edges))
  assert first_last.tolist() == [0, 699]


def test_greedy_choice_and_logprob():
  logits = jnp.asarray([[0.5, 3.0, 3.0, -1.0], [2.0, 0.0, 1.0, 1.9]], jnp.float32)
  tokens, logp = SM.choose_tokens(logits, SM.row_keys(jax.random.key(0), 2), 0,
                                  SM.SamplingConfig(temperature=0.0, max_new_tokens=1))
  assert np.asarray(tokens).tolist() == [1, 0]  # lowest id on ties, like argmax
  np.testing.assert_allclose(np.asarray(logp), np.asarray(jax.nn.log_softmax(logits))[[0, 1], [1, 0]], rtol=1e-6)


def test_model_samples_follow_prefill_distribution(model):
  """2,000 one-token samples of one prompt (group sharing) vs softmax of the full forward's logits."""
  batch = make_prompts(1, rows=[[("text", 5), ("video", (2, 4, 4)), ("text", 3)]])
  config = SM.SamplingConfig(temperature=0.05, top_k=5, max_new_tokens=1, eos_ids=(999,), pad_id=990)
  out = SM.sample(model, batch, key=jax.random.key(1), config=config, group_size=2000)
  n = batch["segment_ids"].sum()
  logits = np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
                            jnp.asarray(batch["segment_ids"]), pixel_values=batch["pixel_values"],
                            vision_pos_hw=batch["vision_pos_hw"], vision_window_ids=batch["vision_window_ids"],
                            vision_group_ids=batch["vision_group_ids"],
                            vision_token_index=batch["vision_token_index"]))[0, n - 1]
  top = np.argsort(-logits)[:5]
  p = np.exp((logits[top] - logits[top].max()) / 0.05)
  p /= p.sum()
  tokens = np.asarray(out.tokens)[:, 0]
  assert set(np.unique(tokens)) <= set(top.tolist())
  freq = np.array([(tokens == t).mean() for t in top])
  print(f"\n[sampler] top-5 probs {np.round(p, 3).tolist()} freq {np.round(freq, 3).tolist()}")
  assert 0.5 * np.abs(freq - p).sum() < 0.04


def test_group_sharing_equals_repeated_prompts_and_one_compile(model):
  batch = make_prompts(2)
  config = SM.SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=8, eos_ids=(992, 990), pad_id=990)
  before = SM.TRACE_COUNTS["sample"]
  shared = SM.sample(model, batch, key=jax.random.key(4), config=config, group_size=3)
  repeated = {k: np.repeat(v, 3, axis=1 if k == "positions" else 0) for k, v in batch.items()}
  plain = SM.sample(model, repeated, key=jax.random.key(4), config=config, group_size=1)
  np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(shared.lengths), np.asarray(plain.lengths))
  np.testing.assert_allclose(np.asarray(shared.logprobs), np.asarray(plain.logprobs), atol=1e-5)
  # The G samples of a prompt differ (they are samples, not copies).
  assert len({tuple(r) for r in np.asarray(shared.tokens)[:3].tolist()}) > 1
  assert SM.TRACE_COUNTS["sample"] == before + 2  # two buckets (B=3, G=3) and (B=9, G=1)
  # Same bucket, other prompts and key: no new compile.
  SM.sample(model, make_prompts(5, length=batch["input_ids"].shape[1]), key=jax.random.key(9), config=config,
            group_size=3)
  assert SM.TRACE_COUNTS["sample"] == before + 2


def test_eos_stop_padding_filler_rows_and_stream(model):
  batch = make_prompts(3)
  greedy = SM.SamplingConfig(temperature=0.0, max_new_tokens=5, eos_ids=(999,), pad_id=990)
  first = np.asarray(SM.sample(model, batch, key=jax.random.key(0), config=greedy).tokens)[:, 0]
  # Make row 0's first greedy token an EOS id: it stops after one token, the rest is padding.
  stop = SM.SamplingConfig(temperature=0.0, max_new_tokens=5, eos_ids=(int(first[0]),), pad_id=990)
  batch["segment_ids"][2] = 0  # a filler row: generates nothing
  out = SM.sample(model, batch, key=jax.random.key(0), config=stop)
  assert np.asarray(out.lengths)[0] == 1 and bool(np.asarray(out.finished)[0])
  np.testing.assert_array_equal(np.asarray(out.tokens)[0, 1:], 990)
  assert np.asarray(out.lengths)[2] == 0 and not bool(np.asarray(out.finished)[2])
  np.testing.assert_array_equal(np.asarray(out.tokens)[2], 990)
  # stream yields the same tokens as sample, column by column.
  config = SM.SamplingConfig(temperature=1.0, top_k=20, max_new_tokens=6, eos_ids=(992,), pad_id=990)
  want = np.asarray(SM.sample(model, batch, key=jax.random.key(5), config=config).tokens)
  got = np.stack(list(SM.stream(model, batch, key=jax.random.key(5), config=config)), axis=1)
  np.testing.assert_array_equal(got, want[:, :got.shape[1]])
  assert got.shape[1] == 6 or np.all(want[:, got.shape[1]:] == 990)


def test_bad_inputs_raise_named_errors(model):
  batch = make_prompts(0)
  config = SM.SamplingConfig(max_new_tokens=2)
  with pytest.raises(SM.SamplingError, match="segment_ids"):
    SM.sample(model, {k: v for k, v in batch.items() if k != "segment_ids"}, key=jax.random.key(0), config=config)
  with pytest.raises(SM.SamplingError, match="vision_pos_hw"):
    SM.sample(model, {k: v for k, v in batch.items() if k != "vision_pos_hw"}, key=jax.random.key(0),
              config=config)
  with pytest.raises(SM.SamplingError, match="top_p"):
    SM.SamplingConfig(top_p=0.0)
  with pytest.raises(SM.SamplingError, match="nucleus_candidates"):
    SM.SamplingConfig(top_p=0.9, nucleus_candidates=(256, 64))
  with pytest.raises(SM.SamplingError, match="group_size"):
    SM.sample(model, batch, key=jax.random.key(0), config=config, group_size=0)


def test_sharded_sampler_equals_single_device():
  assert len(jax.devices()) == 8
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  single = Qwen25VL(TINY, rngs=nnx.Rngs(6), dtype=jnp.float32, rules=S.LOGICAL_RULES)
  sharded = S.shard_model(Qwen25VL(TINY, rngs=nnx.Rngs(6), dtype=jnp.float32, rules=S.LOGICAL_RULES), mesh)
  assert sharded.text.layers.q_proj.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  batch = make_prompts(4, rows=[[("text", 3), ("video", (2, 4, 4)), ("text", 5)], [("text", 6)]])
  config = SM.SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, eos_ids=(992,), pad_id=990)
  want = SM.sample(single, batch, key=jax.random.key(2), config=config, group_size=2)
  with jax.set_mesh(mesh):
    got = SM.sample(sharded, batch, key=jax.random.key(2), config=config, group_size=2)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_sample_and_stream_decode_with_the_models_decode_weights(tie, monkeypatch):
  """`sample` and `stream` hand the decode loop `model.decode_weights()` (on CPU: the table packed for the
  CPU kernel, or where it cannot run the tied fp32 table as a `[D, V]` copy, else no head; the layers one
  state each, run unrolled on a per-layer cache); the loop's results do not show it, so the calls are
  checked -- and the tokens equal those of the stacked scan (layer copies off by `DECODE_LAYER_COPY_LIMIT`)."""
  import dataclasses
  from vt_jax.model import modeling
  config = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, tie_word_embeddings=tie))
  model = Qwen25VL(config, rngs=nnx.Rngs(3), dtype=jnp.float32)
  seen = []
  for name in ("_sample_jit", "_step_jit"):
    real = getattr(SM, name)
    monkeypatch.setattr(SM, name, lambda *a, real=real, **kw: (seen.append(a[-1]), real(*a, **kw))[1])
  batch = make_prompts(4)
  sampling = SM.SamplingConfig(temperature=1.0, max_new_tokens=5, eos_ids=(999,), pad_id=990)
  unrolled = SM.sample(model, batch, key=jax.random.key(0), config=sampling)
  streamed = list(SM.stream(model, batch, key=jax.random.key(0), config=sampling))
  assert len(seen) == 1 + len(streamed)  # one sample call, one per stream step
  table = model.text.embed_tokens[...] if tie else model.lm_head.kernel[...].T
  for weights in seen:
    if cpu_kernels.unavailable() is None:  # the packed table for the CPU kernel, untied heads too
      assert weights.head is None
      np.testing.assert_array_equal(np.asarray(weights.packed_head), np.asarray(cpu_kernels.pack_table(table)))
    elif tie:
      np.testing.assert_array_equal(np.asarray(weights.head), np.asarray(table).T)
    else:
      assert weights.head is None
    assert len(weights.layers) == config.text.num_hidden_layers
  np.testing.assert_array_equal(np.stack(streamed, 1), np.asarray(unrolled.tokens)[:, :len(streamed)])
  monkeypatch.setattr(modeling, "DECODE_LAYER_COPY_LIMIT", 0)
  seen.clear()
  scanned = SM.sample(model, batch, key=jax.random.key(0), config=sampling)
  assert seen[0].layers is None
  np.testing.assert_array_equal(np.asarray(scanned.tokens), np.asarray(unrolled.tokens))
  np.testing.assert_allclose(np.asarray(scanned.logprobs), np.asarray(unrolled.logprobs), atol=1e-5)


def test_vision_rows_encoded_one_by_one_equal_the_batch(model):
  """Inference on one CPU device encodes the vision rows one after another (`vision_row_by_row`); the
  embeddings equal those of the batched tower (a row without vision too), and not inside a mesh."""
  from vt_jax.model.modeling import vision_row_by_row  # pylint: disable=import-outside-toplevel
  batch = make_prompts(7, rows=[[("video", (2, 4, 4))], [("text", 6)], [("image", (1, 4, 4)), ("video", (2, 4, 8))]])
  args = [jnp.asarray(batch[k]) for k in SM.VISION_KEYS]
  assert args[0].shape[0] == 3
  encode = nnx.jit(lambda m, a, row_by_row: m.encode_vision(*a, row_by_row=row_by_row), static_argnums=2)
  rows, batched = encode(model, args, True), encode(model, args, False)
  np.testing.assert_allclose(np.asarray(rows), np.asarray(batched), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(batched)).max() > 0.1
  loops = lambda flag: str(jax.make_jaxpr(lambda a: model.encode_vision(*a, row_by_row=flag))(args)).count("scan[")
  assert loops(True) > loops(False)  # the rows really go through a map
  assert vision_row_by_row()
  with jax.set_mesh(S.make_mesh(data=8)):
    assert not vision_row_by_row()


def test_sampler_encodes_vision_row_by_row_on_one_cpu_device(model, monkeypatch):
  from vt_jax.model import modeling  # pylint: disable=import-outside-toplevel
  seen = []
  real = modeling.Qwen25VL.encode_vision
  monkeypatch.setattr(modeling.Qwen25VL, "encode_vision",
                      lambda self, *a, **kw: (seen.append(kw.get("row_by_row")), real(self, *a, **kw))[1])
  config = SM.SamplingConfig(temperature=1.0, max_new_tokens=2, eos_ids=(999,), pad_id=990)
  SM._sample_jit.clear_cache()  # pylint: disable=protected-access  (traced afresh: the call is seen)
  SM.sample(model, make_prompts(8), key=jax.random.key(0), config=config)
  assert seen == [True]
