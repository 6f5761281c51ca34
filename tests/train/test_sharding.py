"""The sharded train step on 8 fake CPU devices (mesh 2 x 2 x 2) equals the same step on one device."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vt_jax.train import distributed, optimizer as optim_lib, trainer

from . import train_fixtures as F


@pytest.fixture(scope="module", autouse=True)
def _compile_cache():
  with F.compilation_cache():
    yield


def _run(mesh, batches, cfg, microbatches):
  """Two train steps on `mesh`; returns (initial params, final state, per-step metrics) on the host."""
  task = F.array_task_class()(cfg, batches)
  with jax.set_mesh(mesh):
    setup = trainer.init_train_state(task, mesh, total_steps=cfg.train.num_steps)
    state, shardings = setup.state, setup.state_shardings
    initial = jax.device_get(state.params)
    step_fn = trainer.make_train_step(task, setup.graphdef, setup.tx, setup.schedule, microbatches=microbatches,
                                      grad_shardings=setup.state_shardings.params)
    jitted, metrics = None, []
    for host_batch in batches:
      batch = distributed.shard_batch(mesh, host_batch, host_batch["input_ids"].shape[0])
      if jitted is None:
        jitted = trainer.jit_train_step(step_fn, shardings, {k: v.sharding for k, v in batch.items()}, mesh)
      state, m = jitted(state, batch)
      metrics.append(jax.device_get(m))
    return initial, shardings, jax.device_get(state), metrics, batch


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8, "tests/conftest.py provides 8 fake CPU devices"
  batches = F.packed_batches(2, F.ROWS, seed=5)
  cfg = F.config()
  mesh8 = distributed.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  mesh1 = distributed.make_mesh({"data": -1}, devices=jax.devices()[:1])
  # Two microbatches: the accumulation scan and its pinned accumulator run sharded too.
  init8, shard8, final8, metrics8, batch8 = _run(mesh8, batches, cfg, microbatches=2)
  init1, _, final1, metrics1, _ = _run(mesh1, batches, cfg, microbatches=2)

  # The 8-device run really is sharded: params over fsdp/tensor, Adam moments like their params, the
  # batch over (data, fsdp) -- positions on its second axis.
  q_spec = shard8.params["text"]["layers"]["q_proj"]["kernel"].spec
  assert q_spec == P(None, "fsdp", "tensor")
  adam = shard8.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert adam.mu["text"]["layers"]["q_proj"]["kernel"].spec == q_spec
  assert adam.nu["lm_head"]["kernel"].spec == shard8.params["lm_head"]["kernel"].spec
  assert adam.count.spec == P()
  assert batch8["input_ids"].sharding.spec == P(("data", "fsdp"), None)
  assert batch8["positions"].sharding.spec == P(None, ("data", "fsdp"), None)
  assert len(batch8["input_ids"].addressable_shards) == 8

  for a, b in zip(jax.tree.leaves(init8), jax.tree.leaves(init1)):
    np.testing.assert_array_equal(a, b)  # the same init whatever the sharding
  for m8, m1 in zip(metrics8, metrics1):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5, atol=1e-5)
  assert metrics8[1]["loss"] != metrics8[0]["loss"]
  flat8 = jax.tree_util.tree_leaves_with_path(final8.params)
  flat1 = jax.tree.leaves(final1.params)
  for (path, a), b in zip(flat8, flat1):
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=optim_lib.path_str(path))
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(init1), flat1))
  assert moved > 1e-4


def test_resolve_mesh_shape():
  assert distributed.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert distributed.resolve_mesh_shape({"fsdp": -1}, 8) == (1, 8, 1)
  assert distributed.resolve_mesh_shape({"data": 2, "fsdp": 4, "tensor": 1}, 8) == (2, 4, 1)
  for bad, msg in (({"data": -1, "fsdp": -1}, "at most one"), ({"data": 3, "fsdp": -1}, "not divisible"),
                   ({"data": 2, "fsdp": 2}, "has 4 devices"), ({"pipeline": 2}, "unknown axes"),
                   ({"data": 0}, "positive")):
    with pytest.raises(distributed.MeshConfigError, match=msg):
      distributed.resolve_mesh_shape(bad, 8)


def test_batch_shards_of_one_process():
  mesh = distributed.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert distributed.process_batch_shard(mesh, 16) == distributed.DataShard(index=0, count=1, rows=16)
  with pytest.raises(distributed.MeshConfigError):
    distributed.process_batch_shard(mesh, 6)  # 6 rows over data x fsdp = 4


def test_optimizer_state_shardings_follow_params():
  mesh = distributed.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  params = {"a": {"kernel": jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("fsdp", "tensor")))},
            "b": jax.device_put(np.ones((4,), np.float32), NamedSharding(mesh, P("fsdp")))}
  tx, _ = optim_lib.make_optimizer(params, peak_lr=1e-3, total_steps=10)
  abstract = jax.eval_shape(tx.init, params)
  shardings = trainer.shardings_like_params(abstract, params, mesh)
  adam = shardings[1][0]
  assert adam.mu["a"]["kernel"].spec == P("fsdp", "tensor") and adam.nu["b"].spec == P("fsdp")
  assert adam.count.spec == P()
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  assert state[1][0].mu["a"]["kernel"].sharding.spec == P("fsdp", "tensor")


def test_sequence_parallel_step_equals_the_plain_one():
  """model.sequence_parallel: the decoder's residual stream is sharded along the sequence over "tensor"
  (XLA then reduce-scatters the layers' outputs instead of all-reducing them); the step computes the same."""
  batches = F.packed_batches(2, F.ROWS, seed=5)
  mesh = distributed.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  runs = {}
  for sp in (False, True):
    cfg = F.config()
    with cfg.unlocked():
      cfg.model.sequence_parallel = sp
    runs[sp] = _run(mesh, batches, cfg, microbatches=1)
  (_, _, plain, m_plain, _), (_, _, seq, m_seq, _) = runs[False], runs[True]
  for a, b in zip(m_seq, m_plain):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(seq.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)

  # ... and really is another program: the model carries the rules, and each device's residual stream
  # holds a quarter of every row ([rows / fsdp, L / tensor, D] in the compiled forward).
  from flax import nnx
  from vt_jax.model import sharding as msh
  batch = batches[0]
  rows, length = batch["input_ids"].shape
  for sp in (False, True):
    cfg = F.config()
    with cfg.unlocked():
      cfg.model.sequence_parallel = sp
    with jax.set_mesh(mesh):
      model = F.array_task_class()(cfg, batches).create_model(mesh)
      assert (model.rules == msh.sequence_parallel_rules()) is sp
      local_residual = f"f32[{rows // 2},{length // 4},{model.config.text.hidden_size}]"
      forward = nnx.jit(lambda m, ids, pos, seg: m(ids, pos, seg, return_hidden=True))
      hlo = forward.lower(model, batch["input_ids"], batch["positions"], batch["segment_ids"]).compile().as_text()
    assert (local_residual in hlo) is sp, (sp, local_residual)


def test_sequence_parallel_rules_shard_the_residual_stream():
  from vt_jax.model import sharding as msh
  from vt_jax.model.text import ACT, RESIDUAL
  assert msh.logical_to_spec(RESIDUAL) == msh.logical_to_spec(ACT) == P(("data", "fsdp"), None, None)
  rules = msh.sequence_parallel_rules()
  assert msh.logical_to_spec(RESIDUAL, rules) == P(("data", "fsdp"), "tensor", None)
  assert msh.logical_to_spec(ACT, rules) == P(("data", "fsdp"), None, None)  # decoding keeps its layout
