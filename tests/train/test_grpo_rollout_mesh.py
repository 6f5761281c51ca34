"""Sampling on a rollout mesh (same devices, heads/MLP over tensor, prompts over data): the mesh keeps the
training mesh's device order, sampled tokens equal the training mesh's with the same key, and a GRPO run
with grpo.rollout_mesh gives the training-mesh run's rewards and losses."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests.train import test_grpo as G
from tests.train.test_sampler import TINY, make_prompts
from vt_jax.model import sharding as S
from vt_jax.train import distributed, grpo, sampler as SM


def test_rollout_mesh_reshapes_the_training_devices_in_order():
  train = distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  roll = distributed.rollout_mesh(train, {"data": -1, "fsdp": 1, "tensor": 4})
  assert dict(roll.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  assert list(roll.devices.flat) == list(train.devices.flat)
  with pytest.raises(distributed.MeshConfigError, match="rollout mesh"):
    distributed.rollout_mesh(train, {"data": 3, "fsdp": 1, "tensor": 4})


def test_rollout_mesh_config_is_checked():
  assert grpo.rollout_mesh_shape({"data": 0, "fsdp": 0, "tensor": 0}) is None
  assert grpo.rollout_mesh_shape(None) is None
  assert grpo.rollout_mesh_shape({"data": -1, "fsdp": 1, "tensor": 2}) == (("data", -1), ("fsdp", 1), ("tensor", 2))
  with pytest.raises(grpo.GRPOConfigError, match="grpo.rollout_mesh"):
    grpo.rollout_mesh_shape({"data": -1, "fsdp": 0, "tensor": 2})
  with pytest.raises(grpo.GRPOConfigError, match="unknown axes"):
    grpo.rollout_mesh_shape({"model": 2})
  with pytest.raises(grpo.GRPOConfigError, match="rollout_param_dtype"):
    grpo.GRPOSettings.from_config(G.grpo_config(**{"grpo.rollout_param_dtype": "float16"}), TINY)
  task = G.ToyTask(G.grpo_config(**{"grpo.rollout_mesh": {"data": -1, "fsdp": 1, "tensor": 3}}), G.prompt_batches(1, 4))
  with pytest.raises(grpo.GRPOConfigError, match="grpo.rollout_mesh=.*does not fit the 8 devices"):
    task.create_model(distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}))


def test_sampling_on_rollout_mesh_equals_training_mesh():
  # tensor=4 splits the tiny model's 2 kv heads too (GSPMD pads them); data=4 x tensor=2 runs in the GRPO test.
  shape = {"data": 2, "fsdp": 1, "tensor": 4}
  train = distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  roll = distributed.rollout_mesh(train, shape)
  model = S.create_model(TINY, train, seed=4, dtype=jnp.float32)
  trained = model.text.layers.q_proj.kernel[...]  # [layers, embed, heads * head_dim]: embed over fsdp=8
  assert trained.sharding.shard_shape(trained.shape) == (2, 64 // 8, 64)
  moved = SM.model_on_mesh(model, roll)
  kernel = moved.text.layers.q_proj.kernel[...]  # heads over tensor, whole over data
  assert kernel.sharding.mesh.shape == roll.shape
  assert kernel.sharding.shard_shape(kernel.shape) == (2, 64, 64 // shape["tensor"])
  np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.text.layers.q_proj.kernel[...]))

  prompts = make_prompts(5, rows=[[("text", 3), ("video", (2, 4, 4)), ("text", 5)], [("text", 6)],
                                  [("image", (1, 4, 4)), ("text", 4)], [("text", 9)]])
  arrays = SM._prompt_arrays(prompts)  # pylint: disable=protected-access
  config = SM.SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=6, eos_ids=(992,), pad_id=990)
  with jax.set_mesh(train):
    want = SM.sample(model, jax.device_put(arrays, NamedSharding(train, P())), key=jax.random.key(7),
                     config=config, group_size=2)
  with jax.set_mesh(roll):
    on_roll = distributed.shard_batch(roll, {k: np.asarray(v) for k, v in arrays.items()}, 4)
    got = SM.sample(moved, on_roll, key=jax.random.key(7), config=config, group_size=2)
    greedy = dataclasses.replace(config, temperature=0.0)
    got_greedy = SM.sample(moved, on_roll, key=jax.random.key(7), config=greedy, group_size=1)
  with jax.set_mesh(train):
    want_greedy = SM.sample(model, jax.device_put(arrays, NamedSharding(train, P())), key=jax.random.key(7),
                            config=greedy, group_size=1)
  assert got.tokens.sharding.mesh.shape == roll.shape
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got_greedy.tokens), np.asarray(want_greedy.tokens))


def test_bf16_sampling_copy_halves_the_bytes():
  train = distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  roll = distributed.rollout_mesh(train, {"data": 4, "fsdp": 1, "tensor": 2})
  model = S.create_model(TINY, train, seed=1, dtype=jnp.float32)
  moved = SM.model_on_mesh(model, roll, dtype=jnp.bfloat16)
  params = lambda m: nnx.to_pure_dict(nnx.state(m, nnx.Param))  # noqa: E731
  leaves = jax.tree.leaves(params(moved))
  assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
  # The training copy is untouched (fp32, its own buffers).
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params(model)))
  # The copy samples (its tokens may differ from fp32 sampling by rounding: not compared).
  prompts = SM._prompt_arrays(make_prompts(2, rows=[[("text", 4)]] * 4))  # pylint: disable=protected-access
  with jax.set_mesh(roll):
    out = SM.sample(moved, distributed.shard_batch(roll, {k: np.asarray(v) for k, v in prompts.items()}, 4),
                    key=jax.random.key(0), config=SM.SamplingConfig(max_new_tokens=3, eos_ids=(992,), pad_id=990),
                    group_size=2)
  assert np.asarray(out.tokens).shape == (8, 3) and np.all(np.isfinite(np.asarray(out.logprobs)))


def test_grpo_with_rollout_mesh_equals_training_mesh(tmp_path):
  """Same rollouts (rewards) and the same update on an fsdp=8 training mesh, sampling there or on a
  data=4 x tensor=2 rollout mesh (fp32 copy: exact sampling)."""
  mesh = distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  over = {"grpo.group_size": 2, "train.num_steps": 1}
  _, plain = G._run(tmp_path / "plain", mesh, **over)  # pylint: disable=protected-access
  _, roll = G._run(tmp_path / "roll", mesh, **over, **{  # pylint: disable=protected-access
      "grpo.rollout_mesh": {"data": -1, "fsdp": 1, "tensor": 2}})
  assert [m["reward/total/mean"] for m in roll] == [m["reward/total/mean"] for m in plain]
  for key in ("loss", "grad_norm", "kl"):
    np.testing.assert_allclose([m[key] for m in roll], [m[key] for m in plain], rtol=1e-5, atol=1e-7, err_msg=key)
  assert all(m["time/reshard_s"] > 0 for m in roll) and "time/reshard_s" not in plain[0]


def test_reshard_goes_through_a_fully_sharded_stop():
  """FSDP -> tensor: no device ever holds a whole leaf in flight, and the values arrive unchanged (the
  staged layout matters on TPU, where the direct move replicated 7B leaves: see sampler._staging)."""
  train = distributed.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  roll = distributed.rollout_mesh(train, {"data": 4, "fsdp": 1, "tensor": 2})
  leaf = jax.device_put((jnp.arange(4 * 128 * 256, dtype=jnp.float32) % 251).reshape(4, 128, 256),
                        NamedSharding(train, P(None, "fsdp", None)))
  target = NamedSharding(roll, P(None, None, "tensor"))
  tree, shardings = {"w": leaf}, {"w": target}
  leaves, treedef = jax.tree.flatten(tree)
  move = SM._resharder(treedef, (leaf.sharding,), (target,), jnp.dtype(jnp.bfloat16))  # pylint: disable=protected-access
  temp = move.lower(leaves).compile().memory_analysis().temp_size_in_bytes
  # In flight per device: about the fp32 target shard (half the leaf; XLA:CPU converts after the
  # all-gather), never the whole leaf.
  assert temp < leaf.size * leaf.dtype.itemsize, temp
  out = SM.reshard(tree, shardings, jnp.bfloat16)["w"]
  assert out.sharding == target and out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(leaf))
