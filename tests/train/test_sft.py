"""SFT loss and the train step against independent numpy computations; optimiser pieces; FLOP count."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vt_jax.train import distributed, flops as flops_lib, optimizer as optim_lib, sft, trainer

from . import train_fixtures as F


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
  with F.compilation_cache():
    yield


@pytest.fixture(scope="module")
def one_device():
  return distributed.make_mesh({"data": -1}, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batch():
  return F.packed_batches(1, F.ROWS, seed=3)[0]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _numpy_nll(logits, batch):
  """Per-token NLL of the targets and the loss mask, [B, L] each, in float64 numpy."""
  logp = _log_softmax(np.asarray(logits, np.float64))
  picked = np.take_along_axis(logp, batch["targets"][..., None].astype(np.int64), -1)[..., 0]
  return -picked, batch["loss_mask"].astype(np.float64)


def test_sft_loss_matches_numpy(one_device, batch):
  cfg = F.config()
  with jax.set_mesh(one_device):
    model = sft.create_model(cfg, one_device)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    # chunk 64 < L = 320: the loss goes through several LM-head chunks.
    loss_sum, weight, _ = jax.jit(lambda b: sft.sft_loss(model, b, chunk_size=64))(jb)
    logits = jax.jit(lambda b: model(b["input_ids"], b["positions"], b["segment_ids"],
                                     **sft.model_inputs(b)))(jb)
  nll, mask = _numpy_nll(logits, batch)
  # Only assistant tokens count, and there are fewer of them than real tokens.
  assert 0 < mask.sum() < (batch["segment_ids"] > 0).sum()
  np.testing.assert_allclose(float(weight), mask.sum())
  np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=2e-6)


def _one_step(cfg, mesh, batch, microbatches, head_scale=1.0):
  task = F.array_task_class()(cfg, [batch])
  with jax.set_mesh(mesh):
    setup = trainer.init_train_state(task, mesh, total_steps=cfg.train.num_steps)
    if head_scale != 1.0:
      # Sharper logits than a fresh init's: token NLLs then differ a lot between rows.
      head = setup.state.params["lm_head"]
      setup.state = setup.state.replace(params={**setup.state.params, "lm_head": {"kernel": head["kernel"] * head_scale}})
    step_fn = trainer.make_train_step(task, setup.graphdef, setup.tx, setup.schedule, microbatches=microbatches,
                                      grad_shardings=setup.state_shardings.params)
    dev = distributed.shard_batch(mesh, batch, batch["input_ids"].shape[0])
    jitted = trainer.jit_train_step(step_fn, setup.state_shardings, {k: v.sharding for k, v in dev.items()}, mesh)
    before = jax.device_get(setup.state)  # a host copy: the step donates the device state
    state, metrics = jitted(setup.state, dev)
    return before, jax.device_get(state), jax.device_get(metrics), setup.graphdef


def test_gradient_accumulation_is_the_global_token_mean(one_device, batch):
  """microbatches=2 gives the loss and update of one full batch, and both equal the numpy loss
  sum(all token NLLs) / sum(all loss tokens) -- not the mean of per-microbatch means."""
  # Adam's first step moves a weight by lr * g / (|g| + eps): with eps = 1e-8 a gradient element near 1e-8
  # (a cancelling sum, e.g. a vocabulary row no target uses) turns fp32 rounding differences between the
  # two summation orders into update differences of ~lr. eps = 1e-3 bounds that amplification at 1.
  cfg = F.config(**{"optim.eps": 1e-3})
  # Unequal microbatches: the rows of microbatch 0 (0, 2, 4, ...) keep only 3 loss tokens each.
  batch = {k: v.copy() for k, v in batch.items()}
  for r in range(0, F.ROWS, 2):
    kept = np.flatnonzero(batch["loss_mask"][r])
    batch["loss_mask"][r, kept[3:]] = 0.0
  s0, s1, m1, graphdef = _one_step(cfg, one_device, batch, microbatches=1, head_scale=40.0)
  _, s2, m2, _ = _one_step(cfg, one_device, batch, microbatches=2, head_scale=40.0)

  with jax.set_mesh(one_device):
    model = nnx.merge(graphdef, trainer.all_params(s0), s0.rest)
    logits = jax.jit(lambda b: model(b["input_ids"], b["positions"], b["segment_ids"], **sft.model_inputs(b)))(
        {k: jnp.asarray(v) for k, v in batch.items()})
  nll, mask = _numpy_nll(logits, batch)
  global_mean = (nll * mask).sum() / mask.sum()
  # Microbatch m holds rows m, m+2, ... (strided); the mean of the two microbatch means differs.
  per_mb = [(nll[m::2] * mask[m::2]).sum() / mask[m::2].sum() for m in range(2)]
  assert abs(np.mean(per_mb) - global_mean) > 1e-2 * global_mean  # far outside the tolerance below

  np.testing.assert_allclose(m1["loss"], global_mean, rtol=2e-6)
  np.testing.assert_allclose(m2["loss"], global_mean, rtol=2e-6)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
  assert m1["loss_weight"] == m2["loss_weight"] == mask.sum()
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)))
  assert moved > 1e-4  # the step did update the params...
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)  # ...the same with and without accumulation (fp32 sums)
  assert int(s1.step) == int(s2.step) == 1


def test_freezing_the_vision_tower_and_merger(one_device, batch):
  cfg = F.config(**{"freeze.vision": True, "freeze.merger": True})
  s0, s1, _, _ = _one_step(cfg, one_device, batch, microbatches=1)
  assert "visual" not in s0.params and "visual" in s0.frozen
  # Frozen params carry no optimiser state: every Adam moment has a trainable param's path.
  moment_paths = {optim_lib.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(s0.opt_state)}
  assert not any("visual" in p for p in moment_paths)
  assert any(p.endswith("text/layers/q_proj/kernel") for p in moment_paths)
  for a, b in zip(jax.tree.leaves(s0.frozen), jax.tree.leaves(s1.frozen)):
    np.testing.assert_array_equal(a, b)
  assert np.abs(s0.params["text"]["embed_tokens"] - s1.params["text"]["embed_tokens"]).max() > 0


def test_split_trainable_groups():
  params = {"visual": {"blocks": {"qkv": {"kernel": 1}}, "merger": {"mlp_0": {"kernel": 2}},
                       "patch_embed": {"kernel": 3}},
            "text": {"embed_tokens": 4}, "lm_head": {"kernel": 5}}
  t, f = optim_lib.split_trainable(params, {"vision": True})
  assert f == {"visual": {"blocks": {"qkv": {"kernel": 1}}, "patch_embed": {"kernel": 3}}}
  assert t == {"visual": {"merger": {"mlp_0": {"kernel": 2}}}, "text": {"embed_tokens": 4}, "lm_head": {"kernel": 5}}
  t, f = optim_lib.split_trainable(params, {"merger": True, "llm": True})
  assert set(f) == {"visual", "text", "lm_head"} and set(f["visual"]) == {"merger"}
  assert optim_lib.merge_params(t, f) == params
  with pytest.raises(ValueError, match="unknown groups"):
    optim_lib.split_trainable(params, {"vison": True})


def test_decay_mask_skips_norms_and_biases():
  params = {"text": {"layers": {"q_proj": {"kernel": 0, "bias": 0}, "input_layernorm": {"weight": 0}},
                     "norm": {"weight": 0}, "embed_tokens": 0},
            "visual": {"blocks": {"norm1": {"weight": 0}, "qkv": {"kernel": 0, "bias": 0}},
                       "merger": {"ln_q": {"weight": 0}, "mlp_0": {"kernel": 0}}}}
  mask = optim_lib.decay_mask(params)
  decayed = {optim_lib.path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
  assert decayed == {"text/layers/q_proj/kernel", "text/embed_tokens", "visual/blocks/qkv/kernel",
                     "visual/merger/mlp_0/kernel"}


def test_schedule_warmup_then_decay():
  s = optim_lib.make_schedule(peak_lr=1.0, total_steps=110, warmup_steps=10, decay="cosine", end_lr_ratio=0.1)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(s(60), 0.1 + 0.9 * 0.5, atol=1e-6)   # half way through the cosine
  np.testing.assert_allclose(s(110), 0.1, atol=1e-6)
  lin = optim_lib.make_schedule(peak_lr=2.0, total_steps=100, decay="linear")
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [2.0, 1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="unknown schedule"):
    optim_lib.make_schedule(peak_lr=1.0, total_steps=10, decay="exp")


def test_adamw_update_matches_numpy():
  """One masked AdamW step with clipping, against the update rule written out in numpy."""
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "norm": {"scale": jnp.array([1.0, 1.0])}}
  grads = {"w": jnp.array([[3.0, 4.0], [0.0, 0.0]]), "norm": {"scale": jnp.array([0.0, 12.0])}}
  tx, _ = optim_lib.make_optimizer(params, peak_lr=0.1, total_steps=10, decay="constant", weight_decay=0.5,
                                   clip_norm=6.5, b1=0.9, b2=0.99, eps=1e-8)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  scale = 6.5 / 13.0  # global norm sqrt(9 + 16 + 144) = 13 > 6.5
  for path, p, g, decay in (("w", params["w"], grads["w"], True),
                            ("scale", params["norm"]["scale"], grads["norm"]["scale"], False)):
    g = np.asarray(g) * scale
    m, v = 0.1 * g / (1 - 0.9), 0.01 * g * g / (1 - 0.99)
    upd = m / (np.sqrt(v) + 1e-8) + (0.5 * np.asarray(p) if decay else 0)
    got = new["w"] if path == "w" else new["norm"]["scale"]
    np.testing.assert_allclose(got, np.asarray(p) - 0.1 * upd, rtol=1e-5)


def test_text_and_vision_flops_against_explicit_loops():
  """The analytic count equals a per-token loop over (token, key) pairs."""
  mc = F.tiny_model_config()
  seg = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  t, v = mc.text, mc.vision
  per_token = 2 * (t.hidden_size * t.num_attention_heads * t.head_dim * 2
                   + 2 * t.hidden_size * t.num_key_value_heads * t.head_dim
                   + 3 * t.hidden_size * t.intermediate_size)
  expected = 0.0
  for row in seg:
    for i, s in enumerate(row):
      if s == 0:
        continue
      keys = sum(1 for j in range(i + 1) if row[j] == s)
      expected += t.num_hidden_layers * (per_token + 4 * t.num_attention_heads * t.head_dim * keys)
      expected += 2 * t.hidden_size * t.vocab_size
  assert flops_lib.text_forward_flops(t, seg) == pytest.approx(expected)

  win = np.array([[1, 1, 2, 2, 2, 0, 0, 0]])
  grp = np.array([[1, 1, 1, 1, 1, 0, 0, 0]])
  dv = v.hidden_size
  n_full = len(v.fullatt_block_indexes)
  exp_v = 5 * 2 * 1176 * dv + v.depth * 5 * 2 * (4 * dv * dv + 3 * dv * v.intermediate_size)
  exp_v += 4 * dv * ((v.depth - n_full) * (2 * 2 + 3 * 3) + n_full * 5 * 5)
  exp_v += 2 * (5 / 4) * (4 * dv * 4 * dv + 4 * dv * v.out_hidden_size)
  assert flops_lib.vision_forward_flops(v, win, grp) == pytest.approx(exp_v)
  both = flops_lib.train_step_flops(mc, {"segment_ids": seg, "vision_window_ids": win, "vision_group_ids": grp})
  assert both == pytest.approx(3 * expected + 3 * exp_v)
  frozen = flops_lib.train_step_flops(mc, {"segment_ids": seg, "vision_window_ids": win, "vision_group_ids": grp},
                                      vision_trained=False)
  assert frozen == pytest.approx(3 * expected + exp_v)
  # With a loss mask the LM head counts only the loss positions (three of the nine real tokens).
  loss_mask = np.array([[0, 0, 1, 0, 1, 0], [0, 0, 0, 1, 0, 0]])
  masked = flops_lib.train_step_flops(mc, {"segment_ids": seg, "loss_mask": loss_mask, "vision_window_ids": win,
                                           "vision_group_ids": grp})
  assert masked == pytest.approx(both - 3 * (9 - 3) * 2 * t.hidden_size * t.vocab_size)
