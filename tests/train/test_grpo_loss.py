"""GRPO loss, advantages, KL and masks against independent numpy implementations (loops allowed here),
values and gradients, for every aggregation mode, with clipping active (several passes) and inactive."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vt_jax.train import grpo_loss as G

MODES = G.AGGREGATIONS
MAX_LEN = 9


# ---------------------------------------------------------------------------------------------------
# Independent numpy reference (float64, explicit loops over sequences and tokens).

def np_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, mode, max_len=MAX_LEN):
  num_seq, num_tok, total, seq_terms = 0, 0, 0.0, []
  for b in range(logp.shape[0]):
    seq_sum, count = 0.0, 0
    for t in range(logp.shape[1]):
      if not mask[b, t]:
        continue
      ratio = np.exp(logp[b, t] - old[b, t])
      clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
      term = -min(ratio * adv[b], clipped * adv[b])
      if beta:
        d = ref[b, t] - logp[b, t]
        term += beta * (np.exp(d) - d - 1)
      seq_sum += term
      count += 1
    if count:
      num_seq += 1
      num_tok += count
      total += seq_sum
      seq_terms.append(seq_sum / count if mode == "seq_mean_token_mean" else seq_sum / max_len)
  if mode == "token_mean":
    return total / max(num_tok, 1)
  return sum(seq_terms) / max(num_seq, 1)


def np_one_pass_grad(logp, ref, adv, mask, beta, mode, max_len=MAX_LEN):
  """Analytic d loss / d logp when old_logp = stop_gradient(logp) (ratio 1, clip inactive)."""
  per_token = -adv[:, None] + (beta * (1 - np.exp(ref - logp)) if beta else 0.0)
  counts = mask.sum(1)
  num_seq = max((counts > 0).sum(), 1)
  if mode == "seq_mean_token_mean":
    weight = mask / np.maximum(counts, 1)[:, None] / num_seq
  elif mode == "token_mean":
    weight = mask / max(mask.sum(), 1)
  else:
    weight = mask / max_len / num_seq
  return per_token * weight


def np_finite_diff(fn, x, h=1e-6):
  grad = np.zeros_like(x)
  for idx in itertools.product(*map(range, x.shape)):
    up, down = x.copy(), x.copy()
    up[idx] += h
    down[idx] -= h
    grad[idx] = (fn(up) - fn(down)) / (2 * h)
  return grad


def random_batch(seed, batch=6, length=MAX_LEN, spread=0.4):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.05, 3.0, (batch, length))
  old = logp + rng.normal(0, spread, (batch, length))      # several passes: the policy has moved
  ref = logp + rng.normal(0, 0.3, (batch, length))
  adv = rng.normal(0, 1, batch)
  lengths = rng.integers(1, length + 1, batch)
  mask = np.arange(length)[None, :] < lengths[:, None]
  return logp, old, ref, adv, mask


def jax_loss(cfg, logp, old, ref, adv, mask, **kw):
  f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)
  return G.grpo_loss(f32(logp), f32(old), f32(ref), f32(adv), jnp.asarray(mask), cfg, **kw)


# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_loss_and_grad_clipping_active(mode, beta, eps_low, eps_high):
  logp, old, ref, adv, mask = random_batch(seed=100 * MODES.index(mode) + 10 * int(beta > 0) + int(eps_high > eps_low))
  cfg = G.GRPOLossConfig(beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, aggregation=mode,
                         max_completion_length=MAX_LEN)
  want = np_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, mode)
  (loss, metrics), grad = jax.value_and_grad(
      lambda lp: jax_loss(cfg, lp, old, ref, adv, mask), has_aux=True)(jnp.asarray(logp, jnp.float32))
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  want_grad = np_finite_diff(lambda lp: np_loss(lp, old, ref, adv, mask, beta, eps_low, eps_high, mode), logp)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
  assert 0.1 < float(metrics["clip_frac"]) < 0.9  # the test really exercises both branches
  assert np.all(np.asarray(grad)[~mask] == 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_one_pass_ratio_one_and_analytic_grad(mode, beta):
  logp, _, ref, adv, mask = random_batch(seed=7)
  cfg = G.GRPOLossConfig(beta=beta, aggregation=mode, max_completion_length=MAX_LEN)

  def loss_fn(lp, use_none):
    old = None if use_none else jax.lax.stop_gradient(lp)
    return G.grpo_loss(lp, old, jnp.asarray(ref, jnp.float32), jnp.asarray(adv, jnp.float32),
                       jnp.asarray(mask), cfg)

  lp = jnp.asarray(logp, jnp.float32)
  want = np_loss(logp, logp, ref, adv, mask, beta, 0.2, 0.2, mode)
  want_grad = np_one_pass_grad(logp, ref, adv, mask, beta, mode)
  for use_none in (True, False):
    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(lp, use_none)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_frac"]) == 0.0
    assert float(metrics["ratio_mean"]) == float(metrics["ratio_min"]) == float(metrics["ratio_max"]) == 1.0


def test_one_pass_reproduces_video_r1():
  """Video-R1: per_token = -(exp(logp - logp.detach()) * A - beta * k3); mean per sequence, then mean."""
  rng = np.random.default_rng(3)
  batch, length, beta = 8, 12, 0.04
  tokens = rng.integers(0, 20, (batch, length))
  tokens[0, 4] = 2
  tokens[1, 0] = 2
  tokens[2, [3, 7]] = 2
  eos = 2
  mask = np.zeros((batch, length), bool)   # Video-R1's mask: positions <= first EOS (all if none)
  for b in range(batch):
    hits = np.flatnonzero(tokens[b] == eos)
    mask[b, :(hits[0] + 1 if hits.size else length)] = True
  logp = -rng.uniform(0.1, 4, (batch, length))
  ref = logp + rng.normal(0, 0.5, (batch, length))
  rewards = rng.integers(0, 3, batch).astype(np.float64)
  grouped = rewards.reshape(-1, 4)
  adv = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, ddof=1, keepdims=True) + 1e-4)).ravel()
  kl = np.exp(ref - logp) - (ref - logp) - 1
  per_token = -(1.0 * adv[:, None] - beta * kl)
  video_r1 = ((per_token * mask).sum(1) / mask.sum(1)).mean()

  jmask = G.completion_mask(jnp.asarray(tokens), eos)
  np.testing.assert_array_equal(jmask, mask)
  jadv = G.group_advantages(jnp.asarray(rewards), 4)
  np.testing.assert_allclose(jadv, adv, rtol=1e-5, atol=1e-6)
  cfg = G.GRPOLossConfig(beta=beta)  # the defaults are Video-R1's
  loss, metrics = G.grpo_loss(jnp.asarray(logp, jnp.float32), None, jnp.asarray(ref, jnp.float32), jadv,
                              jmask, cfg)
  np.testing.assert_allclose(loss, video_r1, rtol=1e-5)
  np.testing.assert_allclose(metrics["kl"], ((kl * mask).sum(1) / mask.sum(1)).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["completion_length"], mask.sum(1).mean(), rtol=1e-6)


def test_metrics_against_numpy():
  logp, old, ref, adv, mask = random_batch(seed=11, batch=8, spread=0.5)
  entropy = np.random.default_rng(0).uniform(0, 3, logp.shape)
  cfg = G.GRPOLossConfig(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, aggregation="token_mean",
                         max_completion_length=MAX_LEN)
  _, m = jax_loss(cfg, logp, old, ref, adv, mask, token_entropy=jnp.asarray(entropy, jnp.float32))
  ratio = np.exp(logp - old)[mask]
  a = np.broadcast_to(adv[:, None], logp.shape)[mask]
  low, high = (ratio < 0.8) & (a < 0), (ratio > 1.28) & (a > 0)
  np.testing.assert_allclose(m["clip_low_frac"], low.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_high_frac"], high.mean(), rtol=1e-6)
  np.testing.assert_allclose(m["clip_frac"], (low | high).mean(), rtol=1e-6)
  np.testing.assert_allclose(m["ratio_mean"], ratio.mean(), rtol=1e-5)
  np.testing.assert_allclose(m["ratio_min"], ratio.min(), rtol=1e-5)
  np.testing.assert_allclose(m["ratio_max"], ratio.max(), rtol=1e-5)
  np.testing.assert_allclose(m["entropy"], entropy[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["policy_loss"], np_loss(logp, old, ref, adv, mask, 0.0, 0.2, 0.28,
                                                       "token_mean"), rtol=1e-5)
  assert low.any() and high.any()


def test_beta_zero_needs_no_reference():
  logp, old, ref, adv, mask = random_batch(seed=5)
  cfg = G.GRPOLossConfig(beta=0.0, aggregation="token_mean")
  loss_none, m_none = jax_loss(cfg, logp, old, None, adv, mask)
  loss_ref, m_ref = jax_loss(cfg, logp, old, ref, adv, mask)
  np.testing.assert_allclose(loss_none, loss_ref, rtol=1e-6)
  assert "kl" not in m_none and float(m_ref["kl"]) > 0  # a given reference is still monitored
  with pytest.raises(ValueError, match="needs ref_logp"):
    jax_loss(G.GRPOLossConfig(beta=0.04), logp, old, None, adv, mask)


@pytest.mark.parametrize("mode", MODES)
def test_micro_batches_with_global_counts_sum_to_full_batch(mode):
  logp, old, ref, adv, mask = random_batch(seed=21, batch=8)
  cfg = G.GRPOLossConfig(aggregation=mode, max_completion_length=MAX_LEN)
  grad_fn = jax.grad(lambda lp, o, r, a, m, **kw: jax_loss(cfg, lp, o, r, a, m, **kw)[0])
  full = jax_loss(cfg, logp, old, ref, adv, mask)[0]
  full_grad = grad_fn(logp, old, ref, adv, mask)
  counts = dict(num_sequences=float((mask.sum(1) > 0).sum()), num_tokens=float(mask.sum()))
  parts = [slice(0, 3), slice(3, 8)]
  total = sum(jax_loss(cfg, logp[s], old[s], ref[s], adv[s], mask[s], **counts)[0] for s in parts)
  np.testing.assert_allclose(total, full, rtol=1e-5)
  grads = np.concatenate([grad_fn(logp[s], old[s], ref[s], adv[s], mask[s], **counts) for s in parts])
  np.testing.assert_allclose(grads, full_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_empty_rows_are_left_out(mode):
  logp, old, ref, adv, mask = random_batch(seed=2, batch=5)
  cfg = G.GRPOLossConfig(aggregation=mode, max_completion_length=MAX_LEN)
  padded = [np.concatenate([x, x[:2]]) for x in (logp, old, ref, adv)]
  padded_mask = np.concatenate([mask, np.zeros_like(mask[:2])])
  loss, m = jax_loss(cfg, *padded[:3], padded[3], padded_mask)
  want, m_want = jax_loss(cfg, logp, old, ref, adv, mask)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["completion_length"], m_want["completion_length"], rtol=1e-6)
  assert np.isfinite(float(jax_loss(cfg, logp, old, ref, adv, np.zeros_like(mask))[0]))


def test_bf16_inputs_compute_in_float32():
  logp, old, ref, adv, mask = random_batch(seed=4)
  cfg = G.GRPOLossConfig(aggregation="token_mean")
  bf = lambda x: jnp.asarray(x, jnp.bfloat16)
  loss, _ = G.grpo_loss(bf(logp), bf(old), bf(ref), bf(adv), jnp.asarray(mask), cfg)
  assert loss.dtype == jnp.float32
  rounded = [np.asarray(bf(x), np.float64) for x in (logp, old, ref, adv)]
  np.testing.assert_allclose(loss, np_loss(*rounded, mask, 0.04, 0.2, 0.2, "token_mean"), rtol=1e-5)


def test_jit_and_sharded_over_8_devices_equal_one_device():
  assert jax.device_count() == 8
  logp, old, ref, adv, mask = random_batch(seed=9, batch=16, spread=0.3)
  cfg = G.GRPOLossConfig(epsilon_high=0.28, aggregation="seq_mean_token_mean")

  @jax.jit
  def step(lp, o, r, a, m):
    return jax.value_and_grad(lambda x: G.grpo_loss(x, o, r, a, m, cfg), has_aux=True)(lp)

  args = [jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv)] + [jnp.asarray(mask)]
  (loss1, metrics1), grad1 = step(*args)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  shard = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data", *([None] * (x.ndim - 1)))))
  sharded = [shard(x) for x in args]
  assert len(sharded[0].sharding.device_set) == 8
  (loss8, metrics8), grad8 = step(*sharded)
  np.testing.assert_allclose(loss8, loss1, rtol=1e-6)
  np.testing.assert_allclose(grad8, grad1, rtol=1e-6, atol=1e-9)
  for k in metrics1:
    np.testing.assert_allclose(metrics8[k], metrics1[k], rtol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------------
# Advantages.

def np_advantages(rewards, group_size, scale_std, eps, ddof):
  out = np.zeros(len(rewards))
  for start in range(0, len(rewards), group_size):
    group = rewards[start:start + group_size]
    mean = sum(group) / group_size
    std = np.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - ddof))
    for i, r in enumerate(group):
      out[start + i] = (r - mean) / (std + eps) if scale_std else r - mean
  return out


@pytest.mark.parametrize("scale_std,ddof", [(True, 1), (True, 0), (False, 1)])
def test_group_advantages(scale_std, ddof):
  rewards = np.random.default_rng(1).integers(0, 3, 24).astype(np.float64) * 0.5
  rewards[:8] = 1.0  # one group with equal rewards -> zero advantage
  got = G.group_advantages(jnp.asarray(rewards), 8, scale_std=scale_std, ddof=ddof)
  np.testing.assert_allclose(got, np_advantages(rewards, 8, scale_std, 1e-4, ddof), rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(got)[:8] == 0)
  assert got.shape == (24,) and got.dtype == jnp.float32


def test_video_r1_std_is_torch_unbiased():
  torch = pytest.importorskip("torch")
  rewards = np.array([2.0, 1.0, 1.0, 0.0, 0.0, 2.0, 1.0, 1.0])
  r = torch.tensor(rewards).view(-1, 4)
  want = ((r - r.mean(1, keepdim=True)) / (r.std(dim=1, keepdim=True) + 1e-4)).view(-1).numpy()
  np.testing.assert_allclose(G.group_advantages(jnp.asarray(rewards), 4), want, rtol=1e-5)


def test_group_advantages_errors_and_stats():
  with pytest.raises(ValueError, match="groups of 3"):
    G.group_advantages(jnp.zeros(8), 3)
  with pytest.raises(ValueError, match="group_size > 1"):
    G.group_advantages(jnp.zeros(4), 1)
  np.testing.assert_array_equal(G.group_advantages(jnp.arange(4.0), 1, scale_std=False), 0)
  stats = G.group_reward_stats(jnp.array([1.0, 1, 1, 1, 0, 1, 0, 1, 2, 2, 2, 2]), 4)
  np.testing.assert_allclose(stats["frac_zero_std_groups"], 2 / 3)
  np.testing.assert_allclose(stats["reward_group_std"], np.std([0, 1, 0, 1], ddof=1) / 3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Completion mask, KL.

def test_completion_mask_against_loops():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 6, (32, 10))
  lengths = rng.integers(0, 11, 32)
  eos_ids = (3, 5)
  want = np.zeros_like(tokens, bool)
  for b in range(32):
    for t in range(int(lengths[b])):
      want[b, t] = True
      if tokens[b, t] in eos_ids:
        break
  got = jax.jit(G.completion_mask, static_argnums=1)(jnp.asarray(tokens), eos_ids, jnp.asarray(lengths))
  np.testing.assert_array_equal(got, want)
  no_eos = G.completion_mask(jnp.array([[1, 2, 4], [3, 3, 3]]), 3)
  np.testing.assert_array_equal(no_eos, [[True, True, True], [True, False, False]])


def test_k3_kl():
  logp = np.array([-1.0, -2.0, -0.5])
  ref = np.array([-1.0, -1.0, -3.0])
  d = ref - logp
  np.testing.assert_allclose(G.k3_kl(jnp.asarray(logp), jnp.asarray(ref)), np.exp(d) - d - 1, rtol=1e-6)
  assert float(G.k3_kl(jnp.float32(-1.0), jnp.float32(-1.0))) == 0.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(aggregation="sum"), "aggregation"), (dict(beta=-1.0), "beta"), (dict(epsilon_low=1.0), "epsilon"),
    (dict(max_completion_length=0), "max_completion_length")])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    G.GRPOLossConfig(**kwargs)
