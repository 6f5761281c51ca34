"""GRPO math: group-relative advantages, the clipped policy loss with a k3 KL term, its aggregations.

Everything here is a pure jax.numpy function with static shapes, meant to be called inside the jitted
GRPO train step. Shapes: B completions (prompts x group size), T completion positions.

The loss per completion token t of sequence b (A_b the advantage of sequence b):

  ratio    = exp(logp - old_logp)                    old_logp stored at rollout time
  surr     = min(ratio * A, clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * A)
  kl       = exp(d) - d - 1,  d = ref_logp - logp     (k3 estimator of KL(policy || reference))
  loss_bt  = -(surr - beta * kl)

then aggregated over the completion mask by one of `AGGREGATIONS`:

  seq_mean_token_mean  mean over each sequence's tokens, then over sequences (GRPO / Video-R1)
  token_mean           sum over all tokens / number of tokens (DAPO)
  seq_sum_const        each sequence's sum / a constant (the max completion length), then mean over
                       sequences (Dr.GRPO: no length bias)

With one optimisation pass per rollout batch, old_logp = stop_gradient(logp): the ratio is 1 in value,
clipping never triggers, and the gradient is A * grad(logp) -- Video-R1's loss
`-(exp(logp - logp.detach()) * A - beta * kl)`, seq_mean_token_mean. With several passes the stored
old_logp differ from logp and the clip bounds the update.

Sequences whose mask is all zero (padding rows) are left out of every mean.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

AGGREGATIONS = ("seq_mean_token_mean", "token_mean", "seq_sum_const")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
  """Static loss settings (hashable: pass as a static argument to jit).

  beta: KL coefficient; 0 drops the reference model (ref_logp may be None).
  epsilon_low / epsilon_high: the clip range [1 - epsilon_low, 1 + epsilon_high] (DAPO's clip-higher
    uses a larger epsilon_high, e.g. 0.28).
  aggregation: one of AGGREGATIONS.
  max_completion_length: the constant divisor of "seq_sum_const" (Dr.GRPO uses the generation budget).
  """
  beta: float = 0.04
  epsilon_low: float = 0.2
  epsilon_high: float = 0.2
  aggregation: str = "seq_mean_token_mean"
  max_completion_length: int = 1024

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"GRPOLossConfig.aggregation={self.aggregation!r}; expected one of {AGGREGATIONS}")
    if self.beta < 0:
      raise ValueError(f"GRPOLossConfig.beta={self.beta} must be >= 0")
    if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
      raise ValueError(f"GRPOLossConfig: need 0 <= epsilon_low < 1 and epsilon_high >= 0, got "
                       f"{self.epsilon_low}, {self.epsilon_high}")
    if self.max_completion_length <= 0:
      raise ValueError(f"GRPOLossConfig.max_completion_length={self.max_completion_length} must be > 0")


def group_advantages(rewards: jax.Array, group_size: int, scale_std: bool = True, eps: float = 1e-4,
                     ddof: int = 1) -> jax.Array:
  """(r - group mean) / (group std + eps) for contiguous groups of `group_size`.

  rewards: [N] with N = num_prompts * group_size, rollouts of one prompt contiguous. Returns [N] float32.
  ddof=1 is the unbiased (Bessel) std that Video-R1 gets from torch's `.std(dim=1)`; ddof=0 is the
  population std. scale_std=False is Dr.GRPO (centre only). A group with equal rewards gets 0.
  """
  n = rewards.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"group_advantages: {n} rewards do not split into groups of {group_size}")
  if scale_std and group_size - ddof < 1:
    raise ValueError(f"group_advantages: std with ddof={ddof} needs group_size > {ddof}, got {group_size}")
  grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
  centred = grouped - grouped.mean(axis=1, keepdims=True)
  if scale_std:
    std = jnp.sqrt(jnp.sum(centred**2, axis=1, keepdims=True) / (group_size - ddof))
    centred = centred / (std + eps)
  return centred.reshape(n)


def group_reward_stats(rewards: jax.Array, group_size: int) -> dict[str, jax.Array]:
  """Per-batch group statistics of rewards [N]: the mean within-group std (unbiased, as Video-R1's
  `reward_std`) and the fraction of groups whose rewards are all equal (they carry no learning signal)."""
  grouped = rewards.astype(jnp.float32).reshape(-1, group_size)
  spread = grouped.max(axis=1) - grouped.min(axis=1)
  std = jnp.std(grouped, axis=1, ddof=1) if group_size > 1 else jnp.zeros(grouped.shape[0])
  return {"reward_group_std": std.mean(), "frac_zero_std_groups": jnp.mean(spread == 0)}


def completion_mask(tokens: jax.Array, eos_ids: int | Sequence[int],
                    lengths: jax.Array | None = None) -> jax.Array:
  """Which completion positions count: up to and including the first EOS, and before `lengths`.

  tokens: [B, T] generated ids; eos_ids: one id or several (e.g. `<|im_end|>` and `<|endoftext|>`);
  lengths: [B] number of generated positions per row (later positions are padding), or None for T.
  Returns [B, T] bool. A row without EOS counts all its positions (a truncated completion).
  """
  eos = jnp.asarray(eos_ids, dtype=tokens.dtype).reshape(-1)
  is_eos = jnp.any(tokens[..., None] == eos, axis=-1)
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before each position
  mask = eos_before == 0
  if lengths is not None:
    mask &= jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return mask


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3 estimator exp(d) - d - 1 with d = ref_logp - logp, elementwise ([B, T] -> [B, T]); >= 0."""
  d = ref_logp - logp
  return jnp.exp(d) - d - 1.0


def clipped_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, epsilon_low: float,
                      epsilon_high: float) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """PPO's clipped objective per token (to maximise).

  logp, old_logp: [B, T]; advantages: [B]. Returns (surrogate [B, T], ratio [B, T], low_clipped [B, T],
  high_clipped [B, T]); a token is low (high) clipped when the clip bound is the active term of the min,
  i.e. ratio < 1 - epsilon_low with A < 0 (ratio > 1 + epsilon_high with A > 0): its gradient is zero.
  """
  adv = advantages[:, None]
  ratio = jnp.exp(logp - old_logp)
  clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
  surrogate = jnp.minimum(ratio * adv, clipped * adv)
  low = (ratio < 1.0 - epsilon_low) & (adv < 0)
  high = (ratio > 1.0 + epsilon_high) & (adv > 0)
  return surrogate, ratio, low, high


def aggregate(per_token: jax.Array, mask: jax.Array, aggregation: str, max_completion_length: int = 1024,
              *, num_sequences: jax.Array | float | None = None,
              num_tokens: jax.Array | float | None = None) -> jax.Array:
  """Reduce a per-token loss [B, T] over the completion mask [B, T] to a scalar (see AGGREGATIONS).

  num_sequences / num_tokens override the batch's own counts of non-empty sequences / mask tokens: with
  micro-batches, pass the counts of the whole batch and the micro-batch losses sum to the full-batch loss.
  """
  mask = mask.astype(jnp.float32)
  seq_tokens = mask.sum(axis=1)
  seq_sum = jnp.sum(per_token * mask, axis=1)
  if num_sequences is None:
    num_sequences = jnp.sum(seq_tokens > 0)
  num_sequences = jnp.maximum(num_sequences, 1)
  if aggregation == "seq_mean_token_mean":
    return jnp.sum(seq_sum / jnp.maximum(seq_tokens, 1)) / num_sequences
  if aggregation == "token_mean":
    if num_tokens is None:
      num_tokens = seq_tokens.sum()
    return seq_sum.sum() / jnp.maximum(num_tokens, 1)
  if aggregation == "seq_sum_const":
    return jnp.sum(seq_sum) / max_completion_length / num_sequences
  raise ValueError(f"aggregate: unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(x * mask) / jnp.maximum(mask.sum(), 1)


def grpo_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, cfg: GRPOLossConfig,
              token_entropy: jax.Array | None = None, *, num_sequences: jax.Array | float | None = None,
              num_tokens: jax.Array | float | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss and its metrics.

  logp: [B, T] log-probs of the sampled completion tokens under the policy being trained.
  old_logp: [B, T] the same under the policy that sampled them (stored at rollout), or None for one pass
    per rollout batch (then stop_gradient(logp): ratio 1, Video-R1's loss).
  ref_logp: [B, T] under the frozen reference, or None when cfg.beta == 0.
  advantages: [B]; mask: [B, T] (bool or 0/1) completion positions, e.g. from `completion_mask`.
  token_entropy: optional [B, T] policy entropies per position, only for the metrics.
  num_sequences, num_tokens: whole-batch counts when this call sees one micro-batch (see `aggregate`).
  Returns (loss scalar, metrics): policy_loss (the surrogate part), kl (per-sequence token mean, then
  mean, as Video-R1 logs it; only when ref_logp is given), clip_low_frac / clip_high_frac / clip_frac
  (fraction of completion tokens), ratio_mean / ratio_min / ratio_max, completion_length (mean tokens per
  non-empty sequence), entropy (token mean, when given). Computed in float32 whatever the input dtype.
  """
  if cfg.beta > 0 and ref_logp is None:
    raise ValueError(f"grpo_loss: beta={cfg.beta} needs ref_logp (set beta=0 to train without a reference)")
  logp = logp.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(logp if old_logp is None else old_logp.astype(jnp.float32))
  advantages = advantages.astype(jnp.float32)
  maskf = mask.astype(jnp.float32)
  reduce = lambda x: aggregate(x, maskf, cfg.aggregation, cfg.max_completion_length,
                               num_sequences=num_sequences, num_tokens=num_tokens)

  surrogate, ratio, low, high = clipped_surrogate(logp, old_logp, advantages, cfg.epsilon_low,
                                                  cfg.epsilon_high)
  per_token = -surrogate
  metrics = {}
  if ref_logp is not None:
    kl = k3_kl(logp, jax.lax.stop_gradient(ref_logp.astype(jnp.float32)))
    if cfg.beta > 0:
      per_token = per_token + cfg.beta * kl
    metrics["kl"] = aggregate(jax.lax.stop_gradient(kl), maskf, "seq_mean_token_mean")
  loss = reduce(per_token)

  sg = jax.lax.stop_gradient
  ratio = sg(ratio)
  seq_tokens = maskf.sum(axis=1)
  big = jnp.finfo(jnp.float32).max
  metrics.update(
      policy_loss=sg(reduce(-surrogate)),
      clip_low_frac=_masked_mean(low, maskf),
      clip_high_frac=_masked_mean(high, maskf),
      clip_frac=_masked_mean(low | high, maskf),
      ratio_mean=_masked_mean(ratio, maskf),
      ratio_min=jnp.min(jnp.where(maskf > 0, ratio, big)),
      ratio_max=jnp.max(jnp.where(maskf > 0, ratio, -big)),
      completion_length=jnp.sum(seq_tokens) / jnp.maximum(jnp.sum(seq_tokens > 0), 1),
  )
  if token_entropy is not None:
    metrics["entropy"] = _masked_mean(sg(token_entropy.astype(jnp.float32)), maskf)
  return loss, metrics
