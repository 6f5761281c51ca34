"""Blockwise vision full attention (attention.group_attention) equals the dense group-masked path, and the
vision tower using it equals transformers' vision tower (tiny random model, fp32, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import torch

import importlib
from vt_jax.model import config as C
from vt_jax.model import hf_io
from vt_jax.model import vision_layout as VL
from vt_jax.model.vision import max_windows_per_group

from tests.model.hf_tiny import TINY, make_hf_model, pixels

A = importlib.import_module("vt_jax.model.attention")  # the package re-exports the function under this name

WS = TINY.vision.window_size  # 56 px: windows of 2 x 2 merged tokens = 16 patches
WP = TINY.vision.window_patches


def _layout(grids, extra_windows=0):
  lay = VL.build_vision_layout(grids, window_size=WS)
  return VL.build_vision_layout(grids, window_size=WS, capacity=lay.capacity + extra_windows * WP)


def _qkv(p, rng, heads=2, dim=8, kv_scale=1.0):
  shape = (1, p, heads, dim)
  return [jnp.asarray(rng.standard_normal(shape).astype(np.float32) * kv_scale) for _ in range(3)]


def _dense(q, k, v, gid):
  return A.attention(q, k, v, gid, gid, causal=False, impl="xla")


def test_plan_of_a_known_layout():
  # Video (grid t=4: 4 groups x 4 windows, merged 4 x 4), image (1 group x 2 windows, merged 2 x 3), 2 padding
  # windows.
  lay = _layout([(4, 8, 8), (1, 4, 6)], extra_windows=2)
  gid = jnp.asarray(lay.group_ids)[None]
  key_windows, fits, span = A.group_window_plan(gid, window_patches=WP, max_group_windows=4)
  starts = [0] * 4 + [4] * 4 + [8] * 4 + [12] * 4 + [16, 16, 18, 18]
  expect = np.array([[s + j if s + j < 20 else -1 for j in range(4)] for s in starts])
  np.testing.assert_array_equal(np.asarray(key_windows[0]), expect)
  assert bool(fits) and int(span) == 4
  assert not bool(A.group_window_plan(gid, window_patches=WP, max_group_windows=3)[1])  # a group has 4


def test_plan_rejects_groups_that_break_the_layout():
  gid = np.repeat(np.array([1, 1, 2, 1, 0]), WP)[None]  # group 1 comes back after group 2
  assert not bool(A.group_window_plan(jnp.asarray(gid), window_patches=WP, max_group_windows=4)[1])
  gid = np.repeat(np.array([1, 2, 2, 0]), WP)[None]
  gid[0, WP + 3] = 1  # one window holding patches of two groups
  assert not bool(A.group_window_plan(jnp.asarray(gid), window_patches=WP, max_group_windows=4)[1])
  gid = np.repeat(np.array([1, 1, 2, 0, 0, 0, 0, 0]), WP)[None]  # a long run of padding windows is fine
  assert bool(A.group_window_plan(jnp.asarray(gid), window_patches=WP, max_group_windows=2)[1])


@pytest.mark.parametrize("seed", range(6))
def test_blockwise_equals_dense_on_random_layouts(seed):
  rng = np.random.default_rng(seed)
  grids = [(int(rng.integers(1, 4)) * 2 if rng.random() < 0.7 else 1, 2 * int(rng.integers(1, 6)),
            2 * int(rng.integers(1, 6))) for _ in range(int(rng.integers(1, 4)))]
  lay = _layout(grids, extra_windows=int(rng.integers(0, 3)))
  gid = jnp.asarray(lay.group_ids)[None]
  windows_per_group = max(len(np.unique(lay.window_ids[lay.group_ids == g])) for g in np.unique(gid) if g)
  g = windows_per_group + int(rng.integers(0, 2))
  q, k, v = _qkv(lay.capacity, rng)
  key_windows, fits, span = A.group_window_plan(gid, window_patches=WP, max_group_windows=g)
  assert bool(fits) and int(span) == windows_per_group
  block = A.blockwise_group_attention(q, k, v, gid, key_windows, window_patches=WP)
  real = lay.group_ids > 0
  diff = float(jnp.abs(block - _dense(q, k, v, gid))[0][real].max())
  assert diff < 1e-5, (grids, g, diff)
  assert np.isfinite(np.asarray(block)).all()


def test_group_attention_falls_back_to_dense_when_a_group_is_too_long():
  rng = np.random.default_rng(1)
  lay = _layout([(2, 4, 4), (1, 8, 8), (2, 4, 4)])  # the image has 4 windows, the videos 1 each
  gid = jnp.asarray(lay.group_ids)[None]
  q, k, v = _qkv(lay.capacity, rng)
  dense = _dense(q, k, v, gid)
  for g, blockwise in ((2, False), (4, True)):
    assert bool(A.group_window_plan(gid, window_patches=WP, max_group_windows=g)[1]) == blockwise
    fn = lambda q, k, v, g=g: A.group_attention(q, k, v, gid, window_patches=WP, max_group_windows=g)
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(q, k, v)), np.asarray(dense), atol=1e-5)  # no padding
    grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
             for f in (fn, lambda q, k, v: _dense(q, k, v, gid))]
    for a, b in zip(*grads):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_group_attention_runs_the_fewest_key_windows_that_hold_every_group():
  assert A.blockwise_sizes(12) == (4, 8, 12) and A.blockwise_sizes(2) == (1, 2) and A.blockwise_sizes(1) == (1,)
  rng = np.random.default_rng(5)
  # Longest group spanning 4 windows (merged 4 x 4 frames) -> the 4-window variant of G = 12; 6 or 8 -> 8.
  for grids, span, branch in (([(4, 8, 8)], 4, 0), ([(2, 8, 8), (1, 8, 10)], 6, 1), ([(1, 8, 16), (2, 8, 8)], 8, 1)):
    lay = _layout(grids, extra_windows=1)
    gid = jnp.asarray(lay.group_ids)[None]
    _, fits, got_span = A.group_window_plan(gid, window_patches=WP, max_group_windows=12)
    assert bool(fits) and int(got_span) == span
    assert int(A.group_attention_branch(fits, got_span, 12)) == branch
    q, k, v = _qkv(lay.capacity, rng)
    out = A.group_attention(q, k, v, gid, window_patches=WP, max_group_windows=12)
    real = lay.group_ids > 0
    diff = float(jnp.abs(out - _dense(q, k, v, gid))[0][real].max())
    assert diff < 1e-5, (grids, diff)
  assert int(A.group_attention_branch(jnp.asarray(False), jnp.asarray(3), 12)) == 3  # dense


def test_chunked_dense_equals_dense_with_gradients():
  rng = np.random.default_rng(4)
  lay = _layout([(3, 4, 8), (1, 6, 6)], extra_windows=1)  # 10 windows: chunks of 3 windows need padding
  gid = jnp.asarray(lay.group_ids)[None]
  q, k, v = _qkv(lay.capacity, rng)
  w = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
  chunked = lambda q, k, v: A.dense_group_attention(q, k, v, gid, query_chunk=3 * WP)
  np.testing.assert_allclose(np.asarray(chunked(q, k, v)), np.asarray(_dense(q, k, v, gid)), atol=1e-6)
  grads = [jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (chunked, lambda q, k, v: _dense(q, k, v, gid))]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_blockwise_gradients_equal_dense():
  rng = np.random.default_rng(2)
  lay = _layout([(4, 4, 8), (1, 6, 6)], extra_windows=1)
  gid = jnp.asarray(lay.group_ids)[None]
  real = jnp.asarray(lay.group_ids > 0)[None, :, None, None]
  q, k, v = _qkv(lay.capacity, rng)
  w = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
  plan = A.group_window_plan(gid, window_patches=WP, max_group_windows=4)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v) * w, 0.0))

  blockwise = jax.grad(loss(lambda q, k, v: A.blockwise_group_attention(q, k, v, gid, plan[0], window_patches=WP)),
                       argnums=(0, 1, 2))(q, k, v)
  dense = jax.grad(loss(lambda q, k, v: _dense(q, k, v, gid)), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(blockwise, dense):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _attention_flops(fn, p, rng):
  q, k, v = _qkv(p, rng)
  return jax.jit(fn).lower(q, k, v).compile().cost_analysis()["flops"]


def test_blockwise_cost_is_linear_in_frames():
  rng = np.random.default_rng(3)
  flops = {}
  for frames in (8, 16, 32):
    lay = _layout([(frames, 8, 8)])  # 4 windows per temporal group
    gid = jnp.asarray(lay.group_ids)[None]
    key_windows = A.group_window_plan(gid, window_patches=WP, max_group_windows=4)[0]
    flops[frames] = (
        _attention_flops(lambda q, k, v: A.blockwise_group_attention(q, k, v, gid, key_windows, window_patches=WP),
                         lay.capacity, rng),
        _attention_flops(lambda q, k, v: _dense(q, k, v, gid), lay.capacity, rng))
  for a, b in ((8, 16), (16, 32)):
    assert flops[b][0] / flops[a][0] == pytest.approx(2.0, rel=0.1), flops  # linear
    assert flops[b][1] / flops[a][1] == pytest.approx(4.0, rel=0.1), flops  # dense: quadratic
  assert flops[32][0] < flops[32][1] / 3


def test_max_windows_per_group():
  assert max_windows_per_group(C.PRESETS["7b"].vision) == 12  # 9 x 13 merged tokens -> 3 x 4 windows
  assert max_windows_per_group(C.PRESETS["7b"].vision, 28 * 28 * 4, max_aspect_ratio=200) == 1
  assert max_windows_per_group(C.PRESETS["7b"].vision, 128 * 28 * 28, max_aspect_ratio=200) == 32  # 1 x 125


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_tiny_blockwise")
  return make_hf_model(path), hf_io.from_pretrained(path, dtype=jnp.float32)


GRIDS = [(4, 8, 8), (2, 6, 8), (1, 4, 4)]  # groups of 4, 4 (partial windows) and 1 windows: 25 windows


@pytest.mark.parametrize("max_group_windows,fits", [(4, True), (2, False)])  # G=2: dense fallback
def test_vision_tower_equals_transformers(models, max_group_windows, fits):
  grids = GRIDS
  hf, ours = models
  rng = np.random.default_rng(max_group_windows)
  px = pixels(grids, rng)
  with torch.no_grad():
    theirs = hf.model.visual(torch.as_tensor(px), grid_thw=torch.tensor(grids)).pooler_output.numpy()
  lay = _layout(grids, extra_windows=3)
  plan = A.group_window_plan(jnp.asarray(lay.group_ids)[None], window_patches=WP, max_group_windows=max_group_windows)
  assert bool(plan[1]) == fits
  inputs = (jnp.asarray(VL.gather_patches(px, lay))[None], jnp.asarray(lay.pos_hw)[None],
            jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])
  saved = ours.visual.max_group_windows
  try:
    ours.visual.max_group_windows = max_group_windows
    out = np.asarray(ours.encode_vision(*inputs)[0])
    ours.visual.max_group_windows = None
    dense = np.asarray(ours.encode_vision(*inputs)[0])
  finally:
    ours.visual.max_group_windows = saved
  index = np.concatenate(lay.merged_index)
  diff_hf = float(np.abs(out[index] - theirs).max())
  diff_dense = float(np.abs(out[index] - dense[index]).max())
  print(f"\n[G={max_group_windows}, blockwise={fits}] vs transformers {diff_hf:.3g}, vs dense {diff_dense:.3g}")
  assert diff_hf <= 1e-4 and diff_dense <= 1e-5
  assert np.isfinite(out).all()


def test_max_group_windows_is_checked():
  with pytest.raises(ValueError, match="max_group_windows=0"):
    from flax import nnx
    from vt_jax.model.vision import VisionTower
    VisionTower(TINY.vision, rngs=nnx.Rngs(0), max_group_windows=0)


def test_sharded_batch_equals_single_device():
  from jax.sharding import NamedSharding, PartitionSpec as P
  from vt_jax.model import sharding as S
  mesh = S.make_mesh(data=2, fsdp=2, tensor=2)
  rng = np.random.default_rng(5)
  grids = [[(2, 8, 8), (1, 4, 4)], [(4, 4, 8)], [(1, 8, 8)], [(2, 4, 4)]]  # 9, 8, 4, 2 windows used
  lays = [VL.build_vision_layout(g, window_size=WS, capacity=12 * WP) for g in grids]
  gid = jnp.asarray(np.stack([lay.group_ids for lay in lays]))
  q, k, v = (jnp.asarray(rng.standard_normal((4, gid.shape[1], 4, 8)).astype(np.float32)) for _ in range(3))
  fn = jax.jit(lambda q, k, v, gid: A.group_attention(q, k, v, gid, window_patches=WP, max_group_windows=4))
  single = fn(q, k, v, gid)
  spec = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  sharded = fn(jax.device_put(q, spec), jax.device_put(k, spec), jax.device_put(v, spec),
               jax.device_put(gid, NamedSharding(mesh, P(("data", "fsdp")))))
  assert bool(A.group_window_plan(gid, window_patches=WP, max_group_windows=4)[1])
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-6)


def _outputs_and_grads(visual, inputs, index):
  """The tower's merged tokens for `inputs` and the parameter gradients of sum(sin(tokens[index]))."""
  graphdef, state = nnx.split(visual)

  def loss(state):
    out = nnx.merge(graphdef, state)(*inputs)[0]
    return jnp.sum(jnp.sin(out[index])), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(state)
  return np.asarray(out), grads


def _assert_equal_towers(label, theirs, index, got, want):
  """`got` = (merged tokens, gradients) equals transformers' tokens `theirs` and `want` (another path's)."""
  diff_hf = float(np.abs(got[0][index] - theirs).max())
  print(f"\n[{label}] vs transformers {diff_hf:.3g}")
  assert diff_hf <= 1e-4
  np.testing.assert_allclose(got[0][index], want[0][index], atol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("per_block", [2, 4])
def test_several_windows_per_attention_block_equal_transformers(models, per_block):
  """Window layers over blocks of 2 or 4 windows (TPU's default fills 128 lanes) keep windows apart by id:
  the tower still equals transformers, and gradients equal one window per block. With ids that do not tell
  the windows apart the result changes, so the blocks really hold several windows."""
  from vt_jax.model.vision import resolve_windows_per_block
  hf, ours = models
  grids = GRIDS
  px = pixels(grids, np.random.default_rng(7))
  with torch.no_grad():
    theirs = hf.model.visual(torch.as_tensor(px), grid_thw=torch.tensor(grids)).pooler_output.numpy()
  lay = _layout(grids, extra_windows=3)  # 28 windows: 2 and 4 both divide it
  assert resolve_windows_per_block(per_block, WP, lay.capacity // WP) == per_block
  inputs = (jnp.asarray(VL.gather_patches(px, lay))[None], jnp.asarray(lay.pos_hw)[None],
            jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])
  index = np.concatenate(lay.merged_index)
  saved = ours.visual.windows_per_block

  def run(setting, window_ids=inputs[2]):
    ours.visual.windows_per_block = setting
    return _outputs_and_grads(ours.visual, (inputs[0], inputs[1], window_ids, inputs[3]), index)

  try:
    out, grads = run(per_block)
    one, grads_one = run(1)
    # Every real patch in window 1: pairs of windows now attend each other.
    merged_ids = jnp.where(inputs[2] > 0, 1, 0)
    mixed = run(per_block, merged_ids)[0]
    mixed_one = run(1, merged_ids)[0]
  finally:
    ours.visual.windows_per_block = saved
  _assert_equal_towers(f"{per_block} windows per block", theirs, index, (out, grads), (one, grads_one))
  assert float(np.abs(mixed[index] - mixed_one[index]).max()) > 1e-3


def test_windows_per_block_setting():
  from vt_jax.model.vision import VisionTower, resolve_windows_per_block
  assert resolve_windows_per_block("auto", 64, 96, "tpu") == 2  # released 112 px windows: 128 lanes
  assert resolve_windows_per_block("auto", 64, 95, "tpu") == 1  # blocks must tile the buffer
  assert resolve_windows_per_block("auto", 16, 28, "tpu") == 4  # gcd(8, 28)
  assert resolve_windows_per_block("auto", 64, 96, "cpu") == 1
  assert resolve_windows_per_block("auto", 64, 96, "gpu") == 1
  assert resolve_windows_per_block("3", 64, 96, "cpu") == 3
  for bad in (0, -1, "x", 1.5, True):
    with pytest.raises(ValueError, match="windows_per_block"):
      resolve_windows_per_block(bad, 64, 96, "cpu")
  with pytest.raises(ValueError, match="windows_per_block"):
    VisionTower(TINY.vision, rngs=nnx.Rngs(0), windows_per_block=0)


@pytest.mark.parametrize("seed", range(3))
def test_splash_group_attention_equals_dense(seed, monkeypatch):
  """Full-attention layers in splash (interpret mode here): a band of G windows when the groups fit (the
  fewest of G/3, 2G/3, G that holds them), the whole buffer when they do not; real patches equal the dense
  XLA path."""
  from vt_jax.model import fast_attention as F
  rng = np.random.default_rng(seed)
  grids = [(int(rng.integers(1, 4)) * 2, 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5)))
           for _ in range(int(rng.integers(1, 3)))]
  lay = _layout(grids)
  lay = _layout(grids, extra_windows=-(lay.capacity // WP) % 8 + 8)  # a multiple of 128 slots, padding windows
  gid = jnp.asarray(lay.group_ids)[None]
  longest = max(len(np.unique(lay.window_ids[lay.group_ids == g])) for g in np.unique(lay.group_ids) if g)
  q, k, v = _qkv(lay.capacity, rng)
  real = lay.group_ids > 0
  dense = _dense(q, k, v, gid)[0][real]
  bands = []
  real_splash = F.splash_attention
  monkeypatch.setattr(F, "splash_attention", lambda *a, band=None, **kw: (bands.append(band),
                                                                         real_splash(*a, band=band, **kw))[1])
  for g, fits in ((longest + 1, True), (max(longest - 1, 1), longest == 1)):
    bands.clear()
    out = A.splash_group_attention(q, k, v, gid, window_patches=WP, max_group_windows=g)
    diff = float(jnp.abs(out[0][real] - dense).max())
    assert diff < 1e-5, (grids, g, diff)
    # Every branch is traced (lax.switch); the one that ran is checked by value above. Bands are g' windows.
    sizes = A.blockwise_sizes(g) if g < lay.capacity // WP else ()
    assert sorted(b for b in bands if b is not None) == sorted(s * WP - 1 for s in sizes)
    assert bool(A.group_window_plan(gid, window_patches=WP, max_group_windows=g)[1]) == fits


@pytest.mark.parametrize("max_group_windows", [4, 2])  # G=2: the groups do not fit, the whole-buffer kernel
def test_vision_layers_in_the_splash_kernel_equal_the_xla_path(models, max_group_windows, monkeypatch):
  """Window blocks of 128 slots (8 tiny windows) and the full-attention layers through Pallas splash
  (interpret mode here), window / group ids as segment ids: the tower equals transformers and the XLA path,
  values and parameter gradients."""
  from vt_jax.model import vision as V
  hf, ours = models
  grids = GRIDS
  px = pixels(grids, np.random.default_rng(11))
  with torch.no_grad():
    theirs = hf.model.visual(torch.as_tensor(px), grid_thw=torch.tensor(grids)).pooler_output.numpy()
  lay = _layout(grids, extra_windows=7)  # 32 windows: 4 blocks of 8
  assert V.resolve_windows_per_block(8, WP, lay.capacity // WP) == 8
  assert V.window_attention_impl("splash", 8 * WP) == "splash"
  inputs = (jnp.asarray(VL.gather_patches(px, lay))[None], jnp.asarray(lay.pos_hw)[None],
            jnp.asarray(lay.window_ids)[None], jnp.asarray(lay.group_ids)[None])
  index = np.concatenate(lay.merged_index)
  saved = ours.visual.windows_per_block, ours.visual.blocks.attention_impl, ours.visual.max_group_windows
  ours.visual.max_group_windows = max_group_windows
  calls = []
  real_attention = V.fast_attention

  def spy(*args, impl, **kwargs):
    calls.append(impl)
    return real_attention(*args, impl=impl, **kwargs)

  def run(impl):
    ours.visual.windows_per_block, ours.visual.blocks.attention_impl = 8, impl
    return _outputs_and_grads(ours.visual, inputs, index)

  monkeypatch.setattr(V, "fast_attention", spy)
  try:
    kernel, grads = run("splash")
    assert set(calls) == {"splash"}
    calls.clear()
    xla, grads_xla = run("xla")
    assert set(calls) == {"xla"}
  finally:
    ours.visual.windows_per_block, ours.visual.blocks.attention_impl, ours.visual.max_group_windows = saved
  _assert_equal_towers(f"splash, G={max_group_windows}", theirs, index, (kernel, grads), (xla, grads_xla))


def test_attention_impl_of_the_vision_layers():
  from vt_jax.model.vision import group_attention_impl, window_attention_impl
  assert window_attention_impl("splash", 128) == "splash"
  assert window_attention_impl("splash", 256) == "splash"
  assert window_attention_impl("splash", 64) == "xla"  # would pad every tile
  for setting in ("auto", "blocked", "cudnn", "xla"):  # windows stay on XLA unless splash is asked for
    assert window_attention_impl(setting, 128) == "xla"
  assert group_attention_impl("auto", 6144, "tpu") == "splash"
  assert group_attention_impl("splash", 512, "cpu") == "splash"
  assert group_attention_impl("auto", 6144, "cpu") == "xla"
  assert group_attention_impl("auto", 6144, "gpu") == "xla"
  assert group_attention_impl("auto", 6100, "tpu") == "xla"
  assert group_attention_impl("xla", 6144, "tpu") == "xla"
