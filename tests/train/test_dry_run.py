"""Dry run: AOT compile for TPU topologies from this CPU-only process, memory/FLOPs table, DoesNotFit."""
import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vt_jax.model import fast_attention
from vt_jax.train import dry_run as dr
from vt_jax.train import tpu_specs

pytest.importorskip("libtpu")  # the `tpu` extra; CI installs it

GiB = 2**30


# ----------------------------------------------------------------------------- topology names


@pytest.mark.parametrize("name,chip,dims,slice_name", [
    ("v5p:4x4x4", "v5p", (4, 4, 4), "v5p-128"),
    ("v5p-64", "v5p", (2, 4, 4), "v5p-64"),      # v5p-N counts TensorCores: 32 chips
    ("v5e:16x16", "v5e", (16, 16), "v5litepod-256"),
    ("v5litepod-256", "v5e", (16, 16), "v5litepod-256"),
    ("v5e-8", "v5e", (2, 4), "v5litepod-8"),
    ("v6e:8x8", "v6e", (8, 8), "v6e-64"),
    ("v6e-64", "v6e", (8, 8), "v6e-64"),
    ("v4-32", "v4", (2, 2, 4), "v4-32"),
    ("V5P:2x2x1", "v5p", (2, 2, 1), "v5p-8"),
])
def test_parse_topology(name, chip, dims, slice_name):
  topo = tpu_specs.parse_topology(name)
  assert topo.chip.name == chip and topo.dims == dims and topo.slice_name == slice_name
  assert topo.num_chips == int(np.prod(dims))
  assert tpu_specs.parse_topology(topo.name) == topo  # the canonical name round-trips


@pytest.mark.parametrize("name,match", [
    ("v5p:4x4", "3-D chip grids"), ("v5e:2x2x2", "2-D chip grids"), ("v5p-63", "multiple of 2"),
    ("v5p-40", "no standard slice of 20 chips"), ("v9x:2x2", "unknown TPU generation"),
    ("tpu", "cannot parse"),
])
def test_parse_topology_errors(name, match):
  with pytest.raises(tpu_specs.TopologyError, match=match):
    tpu_specs.parse_topology(name)


def test_chip_table_is_public_numbers():
  v5p = tpu_specs.chip_spec("v5p")
  assert v5p.peak_bf16_flops == 459e12 and v5p.hbm_bytes == 95 * GiB
  assert tpu_specs.chip_spec("v5litepod").peak_bf16_flops == 197e12
  assert tpu_specs.chip_spec("trillium").peak_bf16_flops == 918e12
  assert tpu_specs.chip_for_device_kind("TPU v5 lite").name == "v5e"
  assert tpu_specs.chip_for_device_kind("cpu") is None
  for chip in tpu_specs.CHIPS.values():  # the compiler's figure is close to the public one
    assert abs(chip.usable_hbm_bytes / chip.hbm_bytes - 1) < 0.06


# ----------------------------------------------------------------------------- dry runs


def mlp_step(params, x):
  """One SGD step of a 2-layer GELU MLP on a squared-activation loss."""
  def loss(params):
    h = jax.nn.gelu(x @ params["w1"])
    return jnp.mean(jnp.square(h @ params["w2"]).astype(jnp.float32))
  value, grads = jax.value_and_grad(loss)(params)
  return value, jax.tree.map(lambda p, g: p - 1e-3 * g.astype(p.dtype), params, grads)


def mlp_args(mesh, d_model=512, d_ff=2048, batch=256, dtype=jnp.bfloat16):
  # FSDP: params split over fsdp on their first axis, the batch over fsdp too.
  def spec(*axes):
    return NamedSharding(mesh, P(*axes))
  params = {"w1": jax.ShapeDtypeStruct((d_model, d_ff), dtype, sharding=spec("fsdp", None)),
            "w2": jax.ShapeDtypeStruct((d_ff, d_model), dtype, sharding=spec("fsdp", None))}
  x = jax.ShapeDtypeStruct((batch, d_model), dtype, sharding=spec("fsdp", None))
  return params, x


def test_mlp_fsdp_step_on_v5p_reports_sane_numbers():
  d_model, d_ff, batch = 512, 2048, 256
  # forward 2 matmuls, backward 3 (no input gradient): 5 x 2*B*D*F.
  mlp_flops = 5 * 2 * batch * d_model * d_ff
  report = dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, d_model, d_ff, batch),
                      topology="v5p:2x2x1", flops_split={"MLP": mlp_flops}, donate_argnums=(0,))
  assert report.platform == "tpu" and report.num_devices == 4 and report.num_chips == 4
  assert report.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
  param_bytes = 2 * d_model * d_ff * 2
  batch_bytes = batch * d_model * 2
  assert report.memory.arguments == (param_bytes + batch_bytes) // 4  # sharded 4 ways
  assert report.memory.aliased == param_bytes // 4                    # donated params reused
  assert report.hbm_per_device == tpu_specs.CHIPS["v5p"].usable_hbm_bytes
  assert report.fits and report.memory.total < 0.01 * report.hbm_budget
  assert 0.9 * mlp_flops / 4 < report.compiler_flops < 1.2 * mlp_flops / 4
  assert report.compiler_seconds > 0 and report.kernel_seconds == 0
  assert 0 < report.mfu <= 1
  # MFU is exactly analytic FLOPs over (devices x peak x time).
  assert report.mfu == pytest.approx(mlp_flops / (4 * 459e12 * report.step_seconds))
  table = dr.format_report(report)
  for text in ("v5p:2x2x1", "arguments", "temporaries", "-> fits", "MLP", "MFU", "roofline"):
    assert text in table, text
  assert report.to_dict()["fits"] is True


def test_splash_attention_step_compiles_in_the_dry_run():
  batch, seq, heads, kv_heads, head_dim = 4, 512, 8, 2, 128

  def step(q, k, v, seg):
    def loss(q, k, v):
      out = fast_attention.splash_attention(q, k, v, seg, seg, causal=True)
      return jnp.mean(jnp.square(out.astype(jnp.float32)))
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  def args(mesh):
    act = NamedSharding(mesh, P("fsdp", None, "tensor"))
    return (jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), jnp.bfloat16, sharding=act),
            jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=NamedSharding(mesh, P("fsdp"))))

  # causal: half of QK^T and PV, forward (2 matmuls) + backward (5): 7 x 2*B*L*L*H*D / 2.
  attn_flops = 7 * batch * seq * seq * heads * head_dim
  report = dr.dry_run(step, args, topology="v5p:2x2x1", mesh_shape={"fsdp": 2, "tensor": 2},
                      flops_split={"attention": attn_flops})
  assert report.kernel_flops_keys == ("attention",)  # found Mosaic kernels in the program
  # The cost model does not see inside the kernels; the analytic FLOPs carry the time.
  assert report.compiler_flops < 0.1 * attn_flops / 4
  assert report.kernel_seconds == pytest.approx(attn_flops / 4 / 459e12)
  assert report.step_seconds > report.kernel_seconds
  assert "Pallas" in dr.format_report(report)
  # Timed by the FLOPs the kernels execute where the caller gives them (backward recomputation, padding).
  executed = dr.dry_run(step, args, topology="v5p:2x2x1", mesh_shape={"fsdp": 2, "tensor": 2},
                        flops_split={"attention": attn_flops}, kernel_flops={"attention": 1.5 * attn_flops})
  assert executed.kernel_seconds == pytest.approx(1.5 * report.kernel_seconds)
  assert executed.mfu < report.mfu
  assert "attention 1.50x analytic" in dr.format_report(executed)


@pytest.mark.parametrize("precision", ["default", "highest"])
def test_vision_group_attention_in_splash_compiles_for_tpu(precision):
  """The vision tower's full-attention layers on TPU: splash over the patch buffer with banded masks in a
  lax.switch, head_dim 80 (not a lane multiple), bf16, forward and backward, compiled by Mosaic -- as a run
  traces it (default precision) and under the tests' global "highest" (the kernel's precision wrapper)."""
  import importlib
  attention = importlib.import_module("vt_jax.model.attention")
  mesh = dr.make_dry_run_mesh("v5e-8", {"fsdp": -1})
  act = NamedSharding(mesh, P("fsdp"))
  q = jax.ShapeDtypeStruct((8, 1024, 2, 80), jnp.bfloat16, sharding=act)
  ids = jax.ShapeDtypeStruct((8, 1024), jnp.int32, sharding=act)

  def loss(q, k, v, ids):
    out = attention.splash_group_attention(q, k, v, ids, window_patches=64, max_group_windows=6)
    return jnp.sum(jnp.square(out.astype(jnp.float32)))

  with jax.default_matmul_precision(precision):
    assert (jax.config.jax_default_matmul_precision in fast_attention._KERNEL_PRECISIONS) == (precision == "default")
    compiled = dr._compile(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, q, q, ids), mesh, "group", "v5e-8")
  hlo = compiled.as_text()
  # Three bands (2, 4, 6 windows) and the whole buffer: forward, dq and dkv kernels of each.
  assert hlo.count("tpu_custom_call") >= 12


def test_costs_come_from_a_compile_without_windowed_einsum():
  """XLA may run FSDP matmuls as windowed-einsum loops (collective matmul) whose bodies its cost model counts
  once; the dry run then recompiles for costs with libtpu's options that turn them off. The detector finds
  such loops in compiled HLO, and libtpu takes the options (it refuses unknown ones)."""
  hlo = ("  %while.3 = (s32[], bf16[8]) while(%tuple.1), condition=%wide.windowed_dot_general_cond_ag, "
         "body=%wide.windowed_dot_general_body_ag.clone.sunk\n"
         "  %while.4 = (s32[]) while(%tuple.2), condition=%region_1.7, body=%wide.region_0.5_spmd.sunk\n")
  assert dr._windowed_einsum_loops(hlo) == 1
  mesh = dr.make_dry_run_mesh("v5p:2x2x1", {"fsdp": 4})
  w = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  x = jax.ShapeDtypeStruct((8, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
  step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.square((x @ w).astype(jnp.float32)))))
  compiled = dr._compile(step, (w, x), mesh, "mlp", "v5p:2x2x1", dr.NO_WINDOWED_EINSUM)
  assert dr._windowed_einsum_loops(compiled.as_text()) == 0
  with pytest.raises(Exception, match="No such compile option"):
    dr._compile(step, (w, x), mesh, "mlp", "v5p:2x2x1", {"xla_tpu_no_such_option": False})


def scanned_layers(ws, x):
  return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def unrolled_layers(ws, x):
  for i in range(ws.shape[0]):
    x = jnp.tanh(x @ ws[i])
  return x


def layer_args(mesh, layers=8, width=1024, rows=1024):
  return (jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
          jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))))


def test_unroll_scans_keeps_values_and_removes_loops():
  ws = jax.random.normal(jax.random.key(0), (3, 16, 16)) / 4
  x = jax.random.normal(jax.random.key(1), (4, 16))

  def loss(ws, x):  # nested: a scan inside remat inside grad, with a gather in the body
    perm = jnp.asarray(np.random.default_rng(0).permutation(16))
    body = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w)[:, perm], None))
    return jnp.sum(jax.lax.scan(body, x, ws)[0] ** 2)

  step = jax.value_and_grad(loss)
  np.testing.assert_allclose(np.asarray(dr.unroll_scans(step)(ws, x)[1]), np.asarray(step(ws, x)[1]),
                             rtol=2e-5, atol=1e-6)  # fusion order differs unrolled
  assert " while(" in jax.jit(step).lower(ws, x).as_text("hlo")
  assert " while(" not in jax.jit(dr.unroll_scans(step)).lower(ws, x).as_text("hlo")


def test_scanned_layers_are_costed_at_their_trip_count():
  # XLA's cost model counts a while-loop body once; by default the dry run asks it about
  # the step with its scans unrolled, which costs what the unrolled layers cost.
  layers, width, rows = 8, 1024, 1024
  split = {"layers": 2 * rows * width * width * layers}
  flat = dr.dry_run(unrolled_layers, layer_args, topology="v5p:2x2x1", flops_split=split)
  loop = dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1", flops_split=split)
  assert flat.while_loops == 0 and loop.while_loops >= 1
  assert loop.cost_source.startswith("the step with scans unrolled")
  assert loop.compiler_flops == pytest.approx(flat.compiler_flops, rel=0.02)
  assert loop.step_seconds == pytest.approx(flat.step_seconds, rel=0.1)
  assert loop.memory == dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1",
                                   loop_cost="once").memory  # memory: the looped program
  # 'once' leaves the compiler's count as is (one body) and says so; 'scale' scales it back.
  once = dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1", flops_split=split, loop_cost="once")
  assert once.compiler_flops == pytest.approx(flat.compiler_flops / layers, rel=0.1)
  assert "count each loop body once" in dr.format_report(once)
  scaled = dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1", flops_split=split, loop_cost="scale")
  assert scaled.loop_scale == pytest.approx(layers, rel=0.1)
  assert 0.5 < scaled.step_seconds / flat.step_seconds < 2.0
  assert "loop trips" in dr.format_report(scaled)
  # 'auto' unrolls a step that compiles fast, and scales one that compiles slowly.
  assert dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1",
                    flops_split=split).cost_source.startswith("the step with scans unrolled")
  slow = dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1", flops_split=split,
                    unroll_limit_s=0.0)
  assert slow.cost_source == "the compiled step" and slow.loop_scale == scaled.loop_scale
  marginal = dr.dry_run(scanned_layers, layer_args, topology="v5p:2x2x1", flops_split=split,
                        loop_cost="marginal")
  assert marginal.cost_source.startswith("the step + one more body per scan group") and marginal.loop_scale == 1
  assert marginal.compiler_flops == pytest.approx(flat.compiler_flops, rel=0.02)


def nested_step(ws, vs, x):
  """grad of: a remat'd scan of 3 blocks, each a scan of 4 layers, then a scan of 5 other layers."""
  def block(h, w4):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), h, w4)[0], None

  def loss(ws, vs, x):
    h = jax.lax.scan(jax.checkpoint(block), x, ws)[0]
    h = jax.lax.scan(lambda h, v: (jnp.sin(h @ v), None), h, vs)[0]
    return jnp.mean(jnp.square(h.astype(jnp.float32)))

  return jax.value_and_grad(loss, argnums=(0, 1))(ws, vs, x)


def nested_args(mesh, width=512, rows=1024):
  rep = NamedSharding(mesh, P())
  return (jax.ShapeDtypeStruct((3, 4, width, width), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((5, width, width), jnp.bfloat16, sharding=rep),
          jax.ShapeDtypeStruct((rows, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp"))))


def test_scan_groups_by_nesting_and_trip_count():
  mesh = dr.make_dry_run_mesh(None, {"fsdp": -1})
  groups = {(g.enclosing, g.length): g.count for g in dr.scan_groups(nested_step, nested_args(mesh), mesh)}
  # Forward + backward of each; the inner layers also in the remat recomputation.
  assert groups == {((), 3): 2, ((), 5): 2, ((3,), 4): 3}, groups
  only_inner = dr.unroll_scans(nested_step, 2, select=lambda enclosing, length: enclosing == (3,))
  args = [np.ones(a.shape, np.float32) for a in nested_args(mesh, width=8, rows=8)]
  hlo = jax.jit(only_inner).lower(*args).as_text("hlo")
  assert " while(" in hlo  # the outer loops stay
  want = nested_step(*args)
  got = only_inner(*args)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_marginal_loop_cost_matches_the_unrolled_step():
  # Nested scans with remat: the marginal cost of one more body per group, solved innermost
  # first, gives every trip's FLOPs, recomputation included, and the time at the rate the cost
  # model gives looped bodies (lower than for the same ops unrolled: 31% vs 57% of peak here).
  width, rows, devices = 2048, 8192, 4
  args = functools.partial(nested_args, width=width, rows=rows)
  marginal = dr.dry_run(nested_step, args, topology="v5p:2x2x1", loop_cost="marginal",
                        name="nested", scan_names={4: "inner layers", 5: "other layers"})
  once = dr.dry_run(nested_step, args, topology="v5p:2x2x1", loop_cost="once", name="nested")
  # Matmul FLOPs per device: 12 inner layers x (forward + recomputed forward + 2 backward) and
  # 5 other layers x (forward + 2 backward), each 2 * rows/devices * width^2.
  matmul = 2 * rows // devices * width * width
  assert marginal.compiler_flops == pytest.approx((12 * 4 + 5 * 3) * matmul, rel=0.03)
  assert marginal.compiler_flops > 8 * once.compiler_flops
  looped_rate = once.compiler_flops / once.compiler_seconds
  assert marginal.compiler_flops / marginal.compiler_seconds == pytest.approx(looped_rate, rel=0.25)
  labels = [label for label, _, _ in marginal.breakdown]
  assert "inner layers (3 loops x 4 in 3)" in labels and "other layers (2 loops x 5)" in labels, labels
  assert sum(s for _, s, _ in marginal.breakdown) == pytest.approx(marginal.compiler_seconds, rel=1e-9)
  assert sum(f for _, _, f in marginal.breakdown) == pytest.approx(marginal.compiler_flops, rel=1e-9)
  # The inner layers hold most of the matmuls: 12 forward (+ 12 recomputed) vs 5 other layers.
  by_label = {label: flops for label, _, flops in marginal.breakdown}
  assert by_label["inner layers (3 loops x 4 in 3)"] > 2 * by_label["other layers (2 loops x 5)"]
  table = dr.format_report(marginal)
  assert "where the time goes" in table and "inner layers" in table


def test_impossible_config_fails_cleanly_in_the_compiler():
  # 128 GiB of fp32 params per device on 95.74 GiB chips: the TPU compiler refuses.
  with pytest.raises(dr.DoesNotFit) as err:
    dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, 2**17, 2**19, 8, jnp.float32),
               topology="v5p:2x2x1", name="huge_step")
  message = str(err.value)
  assert "huge_step does not fit on v5p:2x2x1" in message
  assert "95.74 GiB of usable HBM" in message and "Levers to try" in message
  # Params: 2 x 2^17 x 2^19 fp32 = 512 GiB, a quarter per device (+ a 4 MiB batch); the
  # compiler's 512 GiB is mostly gradients and gathered weights, i.e. temporaries.
  assert "Arguments (params, optimiser state, batch) are 128.00 GiB of it (25%)" in message
  assert "temporaries is the largest term" in message and "remat" in message
  # Each lever names the setting that pulls it.
  assert all(setting in message for setting in ("model.remat=full", "train.microbatches", "train.logprob_chunk",
                                                "model.attention=auto"))


def test_over_budget_names_the_overflowing_term_and_levers():
  # A frozen fp32 table of 4 GiB, 1 GiB per device under FSDP, against a 0.5% budget
  # (0.48 GiB): it compiles, and the arguments overflow.
  def lookup_step(table, ids):
    return jnp.sum(table[ids])

  def args(mesh):
    return (jax.ShapeDtypeStruct((2**15, 2**15), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
            jax.ShapeDtypeStruct((8,), jnp.int32, sharding=NamedSharding(mesh, P())))

  with pytest.raises(dr.DoesNotFit) as err:
    dr.dry_run(lookup_step, args, topology="v5p:2x2x1", hbm_fraction=0.005)
  report = err.value.report
  assert report is not None and report.fits is False and report.memory.arguments >= GiB
  message = str(err.value)
  assert "lookup_step does not fit on v5p:2x2x1" in message
  assert "arguments is the largest term" in message and "fsdp axis is 4" in message
  over = (report.memory.total - report.hbm_budget) / GiB
  assert f"{over:.2f} GiB over the budget of {report.hbm_budget / GiB:.2f} GiB" in message
  assert "donate" not in message  # the outputs are a scalar


def test_activation_overflow_suggests_remat_and_donation():
  args = lambda mesh: mlp_args(mesh, 2**12, 2**13, 8)  # ~70 MiB per device vs a 49 MiB budget
  with pytest.raises(dr.DoesNotFit) as err:
    dr.dry_run(mlp_step, args, topology="v5p:2x2x1", hbm_fraction=0.0005)
  message = str(err.value)
  assert "temporaries is the largest term" in message and "remat" in message
  # Each lever names the setting that pulls it.
  assert all(setting in message for setting in ("model.remat=full", "train.microbatches", "train.logprob_chunk",
                                                "model.attention=auto"))
  assert "donate the train state" in message  # new params are not written over the old
  # check_fit=False hands back the report instead of raising.
  report = dr.dry_run(mlp_step, args, topology="v5p:2x2x1", hbm_fraction=0.0005, check_fit=False)
  assert report.fits is False and "DOES NOT FIT" in dr.format_report(report)


@pytest.mark.parametrize("topology,devices,chips,hbm_gib", [
    ("v5e:2x2", 4, 4, 15.75), ("v6e:2x2", 4, 4, 31.25),
    ("v4:2x2x1", 8, 4, 15.25),  # compile-only v4 devices are TensorCores, 2 per chip
])
def test_other_generations(topology, devices, chips, hbm_gib):
  report = dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, 256, 512, 64), topology=topology,
                      flops_split={"MLP": 5 * 2 * 64 * 256 * 512})
  assert (report.num_devices, report.num_chips) == (devices, chips)
  assert report.hbm_per_device == pytest.approx(hbm_gib * GiB, rel=1e-6)
  chip = tpu_specs.parse_topology(topology).chip
  assert report.peak_flops_per_device == chip.peak_bf16_flops * chips / devices
  assert report.step_seconds > 0 and 0 < report.mfu <= 1


def test_roofline_time_when_the_compiler_gives_none():
  # libtpu 0.0.42.1 answers optimal_seconds = -1 for this v4 step; the dry run falls back to
  # the roofline of the cost model's own FLOPs and bytes.
  report = dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, 1024, 4096, 1024), topology="v4:2x2x1",
                      flops_split={"MLP": 5 * 2 * 1024 * 1024 * 4096})
  assert "roofline max(FLOPs / peak" in dr.format_report(report)
  chip = tpu_specs.chip_spec("v4")
  assert report.compiler_seconds >= report.compiler_flops / (chip.peak_bf16_flops / 2)
  assert 0 < report.mfu <= 1


def test_present_devices_without_topology():
  report = dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, 64, 128, 16), mesh_shape={"fsdp": -1})
  assert report.platform == "cpu" and report.num_devices == len(jax.devices())
  assert report.target == f"the present {len(jax.devices())} cpu devices"
  assert report.hbm_per_device is None and report.fits is None and report.memory.arguments > 0
  assert "fit not checked" in dr.format_report(report)


def test_setup_errors_are_clear():
  with pytest.raises(dr.DryRunError, match="does not divide 4 devices"):
    dr.make_dry_run_mesh("v5p:2x2x1", {"data": 3, "fsdp": -1})
  with pytest.raises(dr.DryRunError, match="has 2 devices, the target has 4"):
    dr.make_dry_run_mesh("v5p:2x2x1", {"data": 2})
  with pytest.raises(tpu_specs.TopologyError, match="cannot parse"):
    dr.make_dry_run_mesh("pod", None)
  with pytest.raises(dr.DryRunError, match="v5e:1x1"):  # below one host's 2x2 chips
    dr.make_dry_run_mesh("v5e:1x1", None)
  with pytest.raises(dr.DryRunError, match="kernel_flops_keys"):
    dr.dry_run(mlp_step, lambda mesh: mlp_args(mesh, 64, 128, 16), topology="v5p:2x2x1",
               flops_split={"MLP": 1.0}, kernel_flops_keys=("attention",))
