"""AdamW with warmup + decay, global-norm clipping, weight-decay masks and frozen parts of the model.

Frozen parameters never reach the optimiser: the trainer splits the params into a trainable and a frozen
tree (`split_trainable`) and builds the optimiser over the trainable tree only, so frozen weights carry no
Adam moments (for a frozen 7B LLM that is 2 x 28 GB of fp32 state not allocated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Parameter paths (joined with "/") that belong to each freezable part of Qwen2.5-VL. The model keeps the
# vision tower under `visual`, its merger under `visual/merger`; everything else is the LLM.
FREEZE_GROUPS = {
    "vision": r"^visual/(?!merger(/|$))",
    "merger": r"^visual/merger(/|$)",
    "llm": r"^(?!visual(/|$))",
}

# No weight decay on normalisation scales and biases (a component named like this anywhere in the path).
NO_DECAY_PATTERN = r"(^|/)([^/]*norm[^/]*|ln_[^/]*|bias|scale)(/|$)"


def path_str(path: Sequence[Any]) -> str:
  """'visual/blocks/attn/qkv/kernel' for a jax key path or a tuple of names."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        k = getattr(k, attr)
        break
    parts.append(str(k))
  return "/".join(parts)


def make_schedule(
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    end_lr_ratio: float = 0.0,
    init_lr_ratio: float = 0.0,
) -> optax.Schedule:
  """Linear warmup from init_lr_ratio*peak to peak over `warmup_steps`, then `decay` to end_lr_ratio*peak
  at `total_steps`. decay: "cosine" | "linear" | "constant"."""
  if total_steps <= 0:
    raise ValueError(f"optimizer: total_steps must be positive, got {total_steps}")
  warmup_steps = int(min(max(warmup_steps, 0), total_steps))
  decay_steps = max(total_steps - warmup_steps, 1)
  end_lr = peak_lr * end_lr_ratio
  if decay == "cosine":
    main = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=end_lr_ratio)
  elif decay == "linear":
    main = optax.linear_schedule(peak_lr, end_lr, decay_steps)
  elif decay == "constant":
    main = optax.constant_schedule(peak_lr)
  else:
    raise ValueError(f"optimizer.decay: unknown schedule {decay!r}; use cosine, linear or constant")
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(peak_lr * init_lr_ratio, peak_lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def decay_mask(params: Any, pattern: str = NO_DECAY_PATTERN) -> Any:
  """A tree of bools like `params`: True where weight decay applies (not norms, not biases).

  Names, not ranks, decide: with layers stacked for `scan` a bias is [layers, dim], not a vector.
  """
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(lambda p, _: regex.search(path_str(p)) is None, params)


def is_frozen(path: str, freeze: Mapping[str, bool]) -> bool:
  """Whether the param at `path` is in one of the frozen groups (freeze = {"vision": bool, ...})."""
  unknown = set(freeze) - set(FREEZE_GROUPS)
  if unknown:
    raise ValueError(f"freeze: unknown groups {sorted(unknown)}; the groups are {sorted(FREEZE_GROUPS)}")
  return any(on and re.search(FREEZE_GROUPS[g], path) for g, on in freeze.items())


def split_trainable(params: Mapping, freeze: Mapping[str, bool]) -> tuple[dict, dict]:
  """Splits a nested dict of params into (trainable, frozen) nested dicts with disjoint leaves."""
  trainable, frozen = {}, {}
  for path, leaf in flatten_params(params):
    target = frozen if is_frozen("/".join(map(str, path)), freeze) else trainable
    set_path(target, path, leaf)
  return trainable, frozen


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of `split_trainable`."""
  out: dict = {}
  for tree in (trainable, frozen):
    for path, leaf in flatten_params(tree):
      set_path(out, path, leaf)
  return out


def flatten_params(tree, prefix=()):
  """Yields (path tuple, leaf) of a nested dict, depth first."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from flatten_params(v, prefix + (k,))
  else:
    yield prefix, tree


def set_path(tree: dict, path: tuple, leaf) -> None:
  """tree[path[0]]...[path[-1]] = leaf, creating dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = leaf


def make_optimizer(
    trainable: Any,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    decay: str = "cosine",
    end_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
    no_decay_pattern: str = NO_DECAY_PATTERN,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """optax chain: clip by global norm -> AdamW(schedule, decoupled decay masked off norms/biases).

  `trainable` (the trainable params tree, arrays or ShapeDtypeStructs) fixes the mask's structure.
  Returns (transformation, schedule); the schedule is indexed by the number of APPLIED updates (the count
  in the optimiser state), so skipped non-finite steps do not advance it.
  """
  schedule = make_schedule(peak_lr=peak_lr, total_steps=total_steps, warmup_steps=warmup_steps,
                           decay=decay, end_lr_ratio=end_lr_ratio)
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=decay_mask(trainable, no_decay_pattern)))
  return optax.chain(*parts), schedule


def opt_step_count(opt_state: Any) -> jax.Array:
  """The number of applied updates recorded in an optax state (the AdamW count)."""
  counts = [x for p, x in jax.tree_util.tree_leaves_with_path(opt_state)
            if path_str(p).endswith("count")]
  return counts[0] if counts else jnp.zeros((), jnp.int32)


def global_norm(tree: Any) -> jax.Array:
  """sqrt(sum of squares) over all leaves, in fp32."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
