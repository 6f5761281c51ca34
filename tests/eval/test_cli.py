"""`python -m vt_jax.eval` end to end on a small synthetic benchmark with a tiny random model saved as a
Hugging Face directory (a missing video, a resumed run), loading an orbax training checkpoint, and the
pieces the CLIs are built from (streaming detokenizer, buckets, tokenizer checks)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vt_jax.data import synth_tokenizer, synthetic
from vt_jax.eval import model_io
from vt_jax.model import config as C, hf_io
from vt_jax.model.modeling import Qwen25VL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_TEST = 6
MAX_NEW = 12
# Decoding, frames and dtype shared by every run below, so outputs of different runs can be compared.
COMMON = ["--max_new_tokens", str(MAX_NEW), "--param_dtype", "float32", "--dtype", "float32", "--no_progress"]


def tiny_config(tokenizer) -> C.ModelConfig:
  """The tiny preset with the synthetic tokenizer's vocabulary and special-token ids."""
  ids = synth_tokenizer.special_token_ids(tokenizer)
  return C.replace_sizes(
      C.get_config("tiny"), text={"vocab_size": ids["vocab_size"]}, image_token_id=ids["image_token_id"],
      video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
      vision_end_token_id=ids["vision_end_token_id"], vision_token_id=ids["vision_token_id"],
      bos_token_id=ids["bos_token_id"], eos_token_ids=(ids["eos_token_id"], ids["pad_token_id"]),
      pad_token_id=ids["pad_token_id"])


def random_model(config: C.ModelConfig, seed: int) -> Qwen25VL:
  """A float32 model with random weights drawn on the host (no per-op compiles, so it takes well under
  a second): norm scales around 1, everything else N(0, 0.1^2) -- larger than the default init, so
  greedy outputs differ between prompts."""
  abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.float32))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(state):
    centre = 1.0 if any("norm" in str(p) for p in path) else 0.0
    flat.append((path, var.replace(jnp.asarray(centre + 0.1 * rng.standard_normal(var.shape), jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def make_tiny_setup(root) -> tuple[synthetic.SyntheticPaths, str, Qwen25VL]:
  """A synthetic dataset (6 test videos) and a random tiny model saved as an HF dir with its tokenizer.

  Deterministic, so test modules of one session share it through `root` (made once, then reused)."""
  # Question types whose wording varies (the colour is named), so prompts differ beyond the video.
  paths = synthetic.ensure_dataset(os.path.join(root, "data"), num_train=4, num_test=NUM_TEST, vocab_size=400,
                                   question_types=("direction", "colour_change", "missing_colour"))
  tokenizer = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  model = random_model(tiny_config(tokenizer), seed=3)
  model_dir = os.path.join(root, "hf_model")
  if not os.path.isfile(os.path.join(model_dir, "tokenizer.json")):  # written last by save_pretrained
    hf_io.save_pretrained(model, model_dir, dtype="float32", tokenizer_dir=paths.tokenizer_dir)
  return paths, model_dir, model


def shared_setup(tmp_path_factory):
  return make_tiny_setup(tmp_path_factory.getbasetemp() / "tiny_synthetic_setup")


def run_cli(module: str, *args: str, cache_dir=None, timeout: int = 240) -> subprocess.CompletedProcess:
  """Runs `python -m module args` with this test session's environment (CPU, 8 fake devices); runs that
  share `cache_dir` reuse each other's compiled programs (JAX's persistent cache), which halves a rerun."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)
  if proc.returncode != 0:
    print(proc.stdout[-4000:], proc.stderr[-4000:])
  return proc


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  return shared_setup(tmp_path_factory)


def test_eval_cli_missing_video_and_resume(setup, tmp_path):
  paths, model_dir, _ = setup
  # A benchmark folder of its own: the dataset's test split, one of whose videos is gone.
  bench = tmp_path / "bench"
  (bench / "videos").mkdir(parents=True)
  records = json.load(open(paths.test_json))
  gone = records[2]["path"]
  for r in records:
    if r["path"] != gone:
      os.symlink(os.path.join(paths.root, r["path"]), bench / r["path"])
  with open(bench / "test.json", "w") as f:
    json.dump(records, f)
  out = tmp_path / "out"
  args = ["--model", model_dir, "--benchmark", "synthetic", "--data_dir", str(bench), "--out", str(out),
          "--batch_size", "2", *COMMON]

  # First run stops after 3 items (as a run killed part-way would), the second resumes.
  first = run_cli("vt_jax.eval", *args, "--limit", "3", cache_dir=tmp_path / "jax_cache")
  assert first.returncode == 0, first.stderr[-2000:]
  run_dir = out / "synthetic_16f"
  before = read_jsonl(run_dir / "predictions.jsonl")
  assert sorted(p["id"] for p in before) == sorted(str(r["problem_id"]) for r in records[:3])

  # The rerun also adds an 8-frame run: one run dir per frame count, and a comparison of the two.
  second = run_cli("vt_jax.eval", *args, "--nframes", "16", "8", cache_dir=tmp_path / "jax_cache")
  assert second.returncode == 0, second.stderr[-2000:]
  preds = read_jsonl(run_dir / "predictions.jsonl")
  assert preds[:3] == before                                  # kept, not regenerated
  assert sorted(p["id"] for p in preds) == sorted(str(r["problem_id"]) for r in records)
  summary = json.load(open(run_dir / "metrics.json"))
  m, run = summary["metrics"], summary["run"]
  # The missing video is counted and listed, never dropped; the second run generated the 3 others.
  assert m["n_items"] == NUM_TEST and m["n_missing_video"] == 1 and m["n_evaluated"] == NUM_TEST - 1
  assert run["generated_this_run"] == NUM_TEST - 3
  missing = [p for p in preds if p["status"] == "missing_video"]
  assert len(missing) == 1 and missing[0]["video_path"].endswith(gone)
  ok = [p for p in preds if p["status"] == "ok"]
  assert all(0 < p["num_tokens"] <= MAX_NEW and p["text"] for p in ok)
  assert len({p["text"] for p in ok}) > 1                     # outputs depend on the video and question
  assert run["nframes"] == 16 and run["options"]["max_pixels"] == synthetic.SYNTH_SAMPLING.max_pixels
  report = (run_dir / "report.md").read_text()
  assert "missing videos: 1" in report and os.path.basename(gone) in report
  for f in ("per_category_accuracy.png", "run.json"):
    assert (run_dir / f).stat().st_size > 0
  eight = json.load(open(out / "synthetic_8f" / "metrics.json"))
  assert eight["run"]["nframes"] == 8 and eight["metrics"]["n_evaluated"] == NUM_TEST - 1
  comparison = (out / "comparison.md").read_text()
  assert "synthetic_16f" in comparison and "synthetic_8f" in comparison
  assert (out / "accuracy_vs_frames.png").stat().st_size > 0
  assert [line.split(":")[0] for line in second.stdout.splitlines() if "items/s" in line] == \
      ["synthetic 16f", "synthetic 8f"]



def test_eval_cli_usage_errors(setup, tmp_path):
  paths, model_dir, _ = setup
  proc = run_cli("vt_jax.eval", "--model", model_dir, "--benchmark", "synthetic", "video_holmes",
                 "--data_dir", paths.root, "--out", str(tmp_path))
  assert proc.returncode == 2 and "video_holmes: no annotation found" in proc.stderr
  with pytest.raises(model_io.ModelLoadError, match="no finished orbax checkpoint"):
    model_io.locate_checkpoint(str(tmp_path))


def make_orbax_workdir(setup, workdir, steps=(20,)):
  """A vt_jax.train workdir holding the setup's model: config.json (tiny preset, the synthetic tokenizer's
  ids, 8 frames of 112x112, the plain prompt) and checkpoints/<step>/state for each step, the params
  zeroed in all but the last."""
  import orbax.checkpoint as ocp
  paths, _, model = setup
  tokenizer = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  ids = synth_tokenizer.special_token_ids(tokenizer)
  train_config = {
      "model": {"preset": "tiny", "hf_dir": None, "vocab_size": ids["vocab_size"],
                "token_ids": {"image_token_id": ids["image_token_id"], "video_token_id": ids["video_token_id"],
                              "vision_start_token_id": ids["vision_start_token_id"],
                              "vision_end_token_id": ids["vision_end_token_id"],
                              "vision_token_id": ids["vision_token_id"], "bos_token_id": ids["bos_token_id"],
                              "eos_token_ids": [ids["eos_token_id"], ids["pad_token_id"]],
                              "pad_token_id": ids["pad_token_id"]}},
      "data": {"tokenizer_dir": paths.tokenizer_dir, "nframes": 8, "min_pixels": 12544, "max_pixels": 12544,
               "prompt": "plain"}}
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(train_config))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for step in steps:
    scale = 1.0 if step == steps[-1] else 0.0
    state = {"params": jax.tree.map(lambda x: x * scale, params), "step": np.int32(step)}
    ocp.PyTreeCheckpointer().save(str(workdir / "checkpoints" / str(step) / "state"), state)
  return workdir


def test_orbax_checkpoint_loads_into_the_same_model(setup, tmp_path):
  """A vt_jax.train workdir (config.json + checkpoints/<step>/state) loads with the params it saved, its
  tokenizer and frame sampling taken from the training config."""
  paths, _, model = setup
  workdir = make_orbax_workdir(setup, tmp_path / "run", steps=(10, 20))
  (workdir / "checkpoints" / "30.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save is never used

  mesh = model_io.make_mesh("1,-1,1")
  loaded = model_io.load_model(str(workdir), mesh=mesh, param_dtype="float32", dtype="float32")
  assert loaded.location.kind == "orbax" and loaded.location.step == 20 and loaded.name.endswith("@step20")
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(loaded.model, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[path][...]), err_msg=str(path))
    assert var[...].sharding.mesh.shape == mesh.shape  # born in its sharding on the 8-device mesh
  sampling = loaded.default_sampling()
  assert (sampling.nframes, sampling.max_pixels, loaded.default_prompt()) == (8, 12544, "plain")
  # bf16 params are restored by casting what was saved.
  bf16 = model_io.load_model(str(workdir / "checkpoints" / "20"), mesh=mesh)
  leaf = jax.tree.leaves(nnx.state(bf16.model, nnx.Param))[0]
  assert leaf.dtype == jnp.bfloat16

  # `python -m vt_jax.convert import` output (config.json + params/) loads too, with a tokenizer named.
  from vt_jax import convert
  native = convert.save_native(model, str(tmp_path / "native"))
  with pytest.raises(model_io.ModelLoadError, match="pass --tokenizer"):
    model_io.load_model(native, mesh=mesh)
  converted = model_io.load_model(native, mesh=mesh, tokenizer=paths.tokenizer_dir, param_dtype="float32")
  assert converted.location.kind == "native"
  np.testing.assert_array_equal(np.asarray(converted.model.lm_head.kernel[...]), np.asarray(model.lm_head.kernel[...]))

  # A step dir without its workdir needs the model named.
  lone = tmp_path / "lone"
  os.rename(workdir / "checkpoints" / "10", lone)
  with pytest.raises(model_io.ModelLoadError, match="--model_config"):
    model_io.load_model(str(lone), mesh=mesh)
  with pytest.raises(model_io.ModelLoadError, match=r"lm_head/kernel has shape \(64, 400\) in the checkpoint"):
    model_io.load_model(str(lone), mesh=mesh, model_config="tiny", tokenizer=paths.tokenizer_dir)


def test_incremental_detokenizer_equals_full_decode(setup):
  paths, _, _ = setup
  tokenizer = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  rng = np.random.default_rng(0)
  text = "<time>00:03-00:07</time> <caption>A red circle — moves ↑ é</caption> <answer>B</answer>"
  for ids in [tokenizer.encode(text, add_special_tokens=False),
              *[rng.integers(0, len(tokenizer), size=40).tolist() for _ in range(5)]]:
    detok = model_io.IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
  # Multi-byte characters come out whole (byte-level BPE splits them over several tokens).
  detok = model_io.IncrementalDetokenizer(tokenizer)
  assert all("\ufffd" not in detok.push(i) for i in tokenizer.encode("↑↓é", add_special_tokens=False))


def test_default_sampling(setup):
  """An HF model has no training config: Video-Thinker's 16 x 128*28*28, except on the synthetic set,
  whose 112x112 frames the demo trains on as they are."""
  _, model_dir, _ = setup
  loaded = model_io.load_model(model_dir, mesh=model_io.make_mesh("1,-1,1"))
  paper = loaded.default_sampling()
  assert (paper.nframes, paper.max_pixels) == (16, 128 * 28 * 28)
  synth = loaded.default_sampling(32, benchmark="synthetic")
  assert (synth.nframes, synth.min_pixels, synth.max_pixels) == (32, 112 * 112, 112 * 112)
  assert loaded.default_prompt() == "video_thinker"


def test_buckets_and_tokenizer_check(setup):
  assert model_io.geometric_buckets(128, 1000) == [128, 256, 384, 512, 768, 1024]
  assert model_io.geometric_buckets(16, 16) == [16]
  paths, _, model = setup
  tokenizer = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  with pytest.raises(model_io.ModelLoadError, match="video_token_id"):
    model_io.check_tokenizer(tokenizer, C.get_config("tiny"), "here")
  assert model_io.check_tokenizer(tokenizer, model.config, "here").video_pad == model.config.video_token_id


def test_generation_mesh(monkeypatch):
  """`--mesh auto`: params over the largest tensor axis that divides the devices, the heads and every
  tensor-sharded dim, replicated over data; over fsdp instead when a tensor shard would fill more than
  half a device."""
  devices = jax.devices()  # 8 fake CPU devices
  shape = lambda config, n: tuple(model_io.generation_mesh(C.get_config(config), jnp.bfloat16, devices[:n]).shape.values())
  assert shape("tiny", 8) == (4, 1, 2)   # 2 kv heads
  assert shape("7b", 8) == (2, 1, 4)     # 4 kv heads; the vision MLP's 3,420 does not split 8 ways
  assert shape("7b", 4) == (1, 1, 4)
  assert shape("7b", 1) == (1, 1, 1)
  monkeypatch.setattr(model_io, "device_memory", lambda device: 4 << 30)  # 7B bf16 / 4 = 3.9 GB > 2 GiB
  assert shape("7b", 8) == (1, 2, 4)
