"""Sharding: logical names on every parameter, params born sharded, and the forward on 8 fake devices
(mesh data=2, fsdp=2, tensor=2) equals the single-device forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vt_jax.model import hf_io, sharding as S
from vt_jax.model.inputs import build_model_inputs
from vt_jax.model.modeling import Qwen25VL

from tests.model.hf_tiny import TINY, make_hf_model, pixels, prompt


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
  return S.make_mesh(data=2, fsdp=2, tensor=2)


def test_logical_rules():
  assert S.logical_to_spec(("layers", "embed", "heads")) == P(None, "fsdp", "tensor")
  assert S.logical_to_spec(("act_batch", "act_length", "act_embed")) == P(("data", "fsdp"), None, None)
  # A mesh axis is used once per spec; axes missing from the mesh are dropped.
  assert S.logical_to_spec(("embed", "embed")) == P("fsdp", None)
  assert S.logical_to_spec(("act_batch", "vocab"), mesh_axes=("data", "tensor")) == P("data", "tensor")
  with pytest.raises(KeyError, match="'embd' has no sharding rule"):
    S.logical_to_spec(("embd",))


def test_every_param_has_logical_names_and_is_born_sharded(mesh):
  model = S.create_model(TINY, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
  reference = Qwen25VL(TINY, rngs=nnx.Rngs(0), dtype=jnp.float32)
  ref_flat = dict(nnx.to_flat_state(nnx.state(reference, nnx.Param)))
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(flat) == len(ref_flat)
  for path, var in flat:
    axes = var.get_metadata()["out_sharding"]
    assert axes and len(axes) == var[...].ndim, path
    assert var[...].sharding == NamedSharding(mesh, S.logical_to_spec(axes)), path
    # Same random streams as an unsharded build (up to float rounding of jit vs eager init).
    np.testing.assert_allclose(var[...], ref_flat[path][...], rtol=1e-5, atol=1e-7, err_msg=str(path))
  assert model.text.layers.q_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")


def test_forward_on_8_devices_equals_single_device(mesh, tmp_path):
  make_hf_model(tmp_path, seed=3)
  single = hf_io.from_pretrained(tmp_path, dtype=jnp.float32)
  sharded = hf_io.from_pretrained(tmp_path, mesh=mesh, dtype=jnp.float32)
  assert sharded.text.layers.gate_proj.kernel[...].sharding.spec == P(None, "fsdp", "tensor")
  rng = np.random.default_rng(0)
  rows = [[("text", 3), ("video", (2, 4, 6)), ("text", 4)], [("image", (1, 4, 4)), ("text", 9)],
          [("text", 14)], [("text", 2), ("video", (1, 6, 4)), ("text", 2)]]
  built = [prompt(r, rng) for r in rows]
  length = 16 * ((max(len(i) for i, _, _ in built) + 15) // 16)
  ids = np.full((4, length), TINY.pad_token_id, np.int64)
  mask = np.zeros_like(ids)
  for b, (i, _, _) in enumerate(built):
    ids[b, :len(i)], mask[b, :len(i)] = i, 1
  images = [g for _, im, _ in built for g in im]
  videos = [g for _, _, v in built for g in v]
  batch = build_model_inputs(TINY, ids, mask, pixels(images, rng), images, pixels(videos, rng), videos, [1.0, 2.0])
  batch.pop("next_position")

  def forward(model, batch):
    return model(batch["input_ids"], batch["positions"], batch["segment_ids"],
                 **{k: v for k, v in batch.items() if k.startswith("vision_") or k == "pixel_values"})

  want = np.asarray(nnx.jit(forward)(single, batch))
  with jax.set_mesh(mesh):
    def place(name, x):
      spec = P(None, ("data", "fsdp")) if name == "positions" else P(("data", "fsdp"))
      return jax.device_put(x, NamedSharding(mesh, spec))
    sharded_batch = {k: place(k, v) for k, v in batch.items()}
    got_arr = nnx.jit(forward)(sharded, sharded_batch)
    assert got_arr.sharding.spec[0] == ("data", "fsdp")  # logits stay batch-sharded
    got = np.asarray(got_arr)
  diff = float(np.abs(got - want)[mask.astype(bool)].max())
  print(f"\n[sharding] 8 devices (data=2, fsdp=2, tensor=2) vs 1: max |logits diff| = {diff:.3g}")
  assert diff <= 1e-5


def test_sharded_kv_cache_decode_equals_single_device(mesh, tmp_path):
  make_hf_model(tmp_path, seed=4)
  single = hf_io.from_pretrained(tmp_path, dtype=jnp.float32)
  sharded = hf_io.from_pretrained(tmp_path, mesh=mesh, dtype=jnp.float32)
  ids = np.random.default_rng(0).integers(0, 900, (4, 8)).astype(np.int32)
  seg = np.ones_like(ids)
  seg[1, 5:] = 0
  positions = np.broadcast_to(np.arange(8), (3, 4, 8)).astype(np.int32)

  def generate(model, ids, positions, seg, cache):
    logits, cache = model.prefill(cache, ids, positions, seg)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    logits2, cache = model.decode_step(cache, token)
    return logits, logits2, cache

  want = nnx.jit(generate)(single, ids, positions, seg, single.init_cache(4, 12, jnp.float32))
  with jax.set_mesh(mesh):
    cache_sh = S.kv_cache_shardings(mesh)
    cache = jax.jit(lambda: sharded.init_cache(4, 12, jnp.float32), out_shardings=cache_sh)()
    assert cache.k.sharding.spec == P(None, ("data", "fsdp"), "tensor", None, None)
    got = nnx.jit(generate)(sharded, ids, positions, seg, cache)
    assert got[2].k.sharding.is_equivalent_to(cache.k.sharding, 5)
  for g, w in zip(got[:2], want[:2]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5)
