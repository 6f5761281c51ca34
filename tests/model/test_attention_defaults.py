"""Default attention settings: `model.attention="auto"` (per backend, per call) and the vision tower's
`max_group_windows` taken from the config through `Qwen25VL`."""
import dataclasses
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only TPU tests, no chips to lock

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.configs import base
from vt_jax.model import config as model_config, fast_attention as fa, vision_layout
from vt_jax.model.attention import attention
from vt_jax.model.modeling import Qwen25VL
from vt_jax.model.vision import max_windows_per_group, parse_max_group_windows

TINY = model_config.get_config("tiny")


def _sds(shape, dtype):
  return jax.ShapeDtypeStruct(shape, dtype)


def test_base_config_defaults():
  c = base.base_config()
  assert c.model.attention == "auto"
  assert c.model.max_group_windows == "auto"


@pytest.mark.parametrize("backend,q,k,decoding,want", [
    ("tpu", (2, 256, 28, 128), (2, 256, 4, 128), False, "splash"),
    ("tpu", (2, 1, 28, 128), (2, 300, 4, 128), True, "xla"),        # decode step: splash is self-attention only
    ("tpu", (2, 256, 28, 128), (2, 256, 4, 128), True, "xla"),      # cache positions given
    ("cuda", (2, 256, 28, 128), (2, 256, 4, 128), False, "cudnn"),
    ("cuda", (2, 255, 28, 128), (2, 255, 4, 128), False, "xla"),    # odd length with a mask: cuDNN refuses
    ("cuda", (2, 256, 28, 12), (2, 256, 4, 12), False, "xla"),      # head dim not a multiple of 8
    ("cuda", (2, 256, 2, 192), (2, 256, 1, 192), False, "xla"),     # head dim over 128
    ("cpu", (2, 256, 28, 128), (2, 256, 4, 128), False, "blocked"),
    ("cpu", (2, 128, 28, 128), (2, 128, 4, 128), False, "xla"),     # one block: nothing to skip
    ("cpu", (2, 1, 28, 128), (2, 300, 4, 128), True, "xla"),        # decode step
    ("rocm", (2, 256, 28, 128), (2, 256, 4, 128), False, "xla"),
])
def test_auto_picks_a_kernel_the_call_fits(backend, q, k, decoding, want):
  assert fa.auto_attention_impl(_sds(q, jnp.bfloat16), _sds(k, jnp.bfloat16), decoding=decoding,
                                backend=backend) == want


def test_auto_keeps_fp32_off_cudnn():
  q, k = _sds((1, 64, 4, 64), jnp.float32), _sds((1, 64, 2, 64), jnp.float32)
  assert fa.auto_attention_impl(q, k, backend="cuda") == "xla"
  assert fa.auto_attention_impl(q, k, backend="tpu") == "splash"


def test_auto_equals_xla_on_cpu_for_prefill_and_decode():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 24, h, 8)), jnp.float32) for h in (4, 2, 2))
  seg = jnp.asarray(np.repeat([[1] * 10 + [2] * 10 + [0] * 4], 2, 0), jnp.int32)
  for causal in (True, False):
    want = attention(q, k, v, seg, seg, causal=causal, impl="xla")
    got = attention(q, k, v, seg, seg, causal=causal, impl="auto")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  pos_q, pos_k = jnp.full((2, 1), 12, jnp.int32), jnp.broadcast_to(jnp.arange(24), (2, 24))
  kw = dict(causal=True, q_positions=pos_q, kv_positions=pos_k)
  np.testing.assert_array_equal(np.asarray(attention(q[:, :1], k, v, seg[:, :1], seg, impl="auto", **kw)),
                                np.asarray(attention(q[:, :1], k, v, seg[:, :1], seg, impl="xla", **kw)))


@pytest.mark.parametrize("value,want", [
    ("auto", max_windows_per_group(TINY.vision)), ("none", None), ("dense", None), (None, None),
    ("3", 3), (5, 5), (np.int32(2), 2)])
def test_parse_max_group_windows(value, want):
  assert parse_max_group_windows(value, TINY.vision) == want


@pytest.mark.parametrize("value", ["0", 0, -1, "x", 2.5, True])
def test_bad_max_group_windows_is_refused(value):
  with pytest.raises(ValueError, match="max_group_windows="):
    parse_max_group_windows(value, TINY.vision)


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (scan, remat, cond branches) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (tuple, list)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _all_eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _all_eqns(sub)


def _score_shapes(jaxpr):
  """Output shapes of every dot_general in a jaxpr, sub-jaxprs included."""
  return [tuple(e.outvars[0].aval.shape) for e in _all_eqns(jaxpr) if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("setting,blockwise", [("2", True), ("none", False)])
def test_qwen25vl_passes_max_group_windows_to_the_vision_tower(setting, blockwise):
  model = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32, max_group_windows=setting)
  assert model.visual.max_group_windows == parse_max_group_windows(setting, TINY.vision)
  v = TINY.vision
  # 4 frames = 2 temporal groups of 8 x 8 patches, each split into several windows of wp patches.
  lay = vision_layout.build_vision_layout([(4, 8, 8)], window_size=v.window_size, patch_size=v.patch_size,
                                          spatial_merge_size=v.spatial_merge_size)
  p, wp = lay.window_ids.shape[0], v.window_patches
  assert p // wp > 2  # more windows than G, so the blockwise path is taken
  args = (jnp.ones((1, p, v.patch_dim), jnp.float32), jnp.asarray(lay.pos_hw)[None],
          jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])
  shapes = _score_shapes(jax.make_jaxpr(model.encode_vision)(*args).jaxpr)
  dense_scores = [s for s in shapes if s.count(p) >= 2]
  # Blockwise: each query window scores G * wp keys; dense: [P, P] scores per head.
  assert bool(dense_scores) is not blockwise, shapes
  assert any(2 * wp in s and wp in s and p not in s for s in shapes) is blockwise, shapes


def test_dry_run_plan_builds_the_model_with_the_config_setting():
  from vt_jax.configs import sft_demo
  from vt_jax.train import dry_run as dr, plan, sft
  cfg = sft_demo.get_config()
  cfg.model.max_group_windows = "3"
  mesh = dr.make_dry_run_mesh(None, {"data": 1, "fsdp": -1, "tensor": 1})
  graphdef, state, _, _ = plan.abstract_train_state(sft.SFTTask(cfg), mesh)
  from vt_jax.train import trainer
  model = nnx.merge(graphdef, trainer.all_params(state), state.rest)
  assert model.visual.max_group_windows == 3


def test_full_attention_period():
  from vt_jax.model.vision import full_attention_period
  assert full_attention_period(model_config.get_config("7b").vision) == 8  # blocks 7, 15, 23, 31 of 32
  assert full_attention_period(TINY.vision) == 2                           # blocks 1, 3 of 4
  irregular = dataclasses.replace(TINY.vision, fullatt_block_indexes=(0, 3))
  assert full_attention_period(irregular) is None
  assert full_attention_period(dataclasses.replace(TINY.vision, fullatt_block_indexes=())) is None


@pytest.mark.parametrize("remat", ["none", "full"])
def test_grouped_vision_schedule_equals_the_cond_scan(monkeypatch, remat):
  # The tower runs regular full-attention layers as groups (scan of window blocks + one full block):
  # same values and gradients as one scan with a lax.cond per block, and no cond left in the program.
  from vt_jax.model import vision as vision_lib
  v = TINY.vision
  tower = vision_lib.VisionTower(v, rngs=nnx.Rngs(1), dtype=jnp.float32, remat=remat, max_group_windows=2)
  lay = vision_layout.build_vision_layout([(4, 8, 8)], window_size=v.window_size, patch_size=v.patch_size,
                                          spatial_merge_size=v.spatial_merge_size)
  p = lay.window_ids.shape[0]
  rng = np.random.default_rng(0)
  args = (jnp.asarray(rng.normal(size=(1, p, v.patch_dim)), jnp.float32), jnp.asarray(lay.pos_hw)[None],
          jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])
  graphdef, params = nnx.split(tower)

  def loss(params, *a):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(*a)))

  def conds(jaxpr):
    return sum(e.primitive.name == "cond" for e in _all_eqns(jaxpr))

  grouped = jax.value_and_grad(loss)(params, *args)
  # Blockwise attention keeps its own exact-fallback cond; the window/full cond is gone.
  n_grouped = conds(jax.make_jaxpr(jax.value_and_grad(loss))(params, *args).jaxpr)
  monkeypatch.setattr(vision_lib, "full_attention_period", lambda cfg: None)
  scanned = jax.value_and_grad(loss)(params, *args)
  n_scanned = conds(jax.make_jaxpr(jax.value_and_grad(loss))(params, *args).jaxpr)
  assert n_grouped < n_scanned
  # fp32 reduction order differs between the two programs (remat fuses differently).
  np.testing.assert_allclose(float(grouped[0]), float(scanned[0]), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(grouped[1]), jax.tree.leaves(scanned[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
