"""The grain loader on the synthetic dataset: exact resume, per-process shards, bad-input handling."""
import dataclasses
import json
import os

import cv2
import numpy as np
import pytest

from vt_jax.data import loader as Ld
from vt_jax.data import packing as K
from vt_jax.data import prompts
from vt_jax.data import records as R
from vt_jax.data import sequences as S
from vt_jax.data import synth_tokenizer, synthetic
from vt_jax.data import video as V

# 4 frames at 112x112 -> grid (2, 8, 8): 32 video tokens, 8 windows of 16 patches at window_size 56.
SAMPLING = V.VideoSampling(nframes=4, min_pixels=112 * 112, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
  return synthetic.generate_dataset(tmp_path_factory.mktemp("synth"), num_train=6, num_test=2, seed=3)


@pytest.fixture(scope="module")
def renderer(synth):
  return S.ChatRenderer(synth_tokenizer.load_tokenizer(synth.tokenizer_dir), prompts.get_prompt())


@pytest.fixture(scope="module")
def recs(synth):
  return R.read_records(synth.train_json, video_roots={"*": os.path.dirname(synth.train_json)},
                        require_trace=True)


def config(**kw):
  base = dict(batch_size=1, seq_len=1024, vision_capacity=256, sampling=SAMPLING, window_size=56,
              pack_bins=2, num_epochs=2, seed=5, prefetch=2)
  return Ld.LoaderConfig(**{**base, **kw})


def run(source, renderer, cfg, **kw):
  it = Ld.make_loader(source, renderer, cfg, shard_index=0, shard_count=1, **kw)
  out = []
  for batch in it:
    out.append((batch, dict(it.metrics)))
  it.close()
  return out


def assert_same(a, b):
  assert len(a) == len(b)
  for (x, mx), (y, my) in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert mx == my


def test_batches_follow_the_contract(recs, renderer):
  cfg = config(batch_size=2)
  batches = run(recs, renderer, cfg)
  batch, metrics = batches[0]
  assert set(batch) == set(K.ROW_KEYS)
  assert batch["input_ids"].shape == (2, 1024) and batch["positions"].shape == (3, 2, 1024)
  assert batch["pixel_values"].shape == (2, 256, 1176)
  assert batch["input_ids"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
  # Two epochs of 6 samples, every one packed once per epoch; the counters match the arrays.
  final = batches[-1][1]
  assert final["samples"] == 12 and final["skipped_total"] == 0
  assert final["tokens"] == sum(int((b["segment_ids"] > 0).sum()) for b, _ in batches)
  assert final["loss_tokens"] == sum(int(b["loss_mask"].sum()) for b, _ in batches)
  assert final["rows"] <= 2 * len(batches)
  assert 0.5 < final["token_efficiency"] <= 1.0
  # Each epoch holds every sample once, in a new order.
  segments = [b["input_ids"][r][b["segment_ids"][r] == k].tobytes() for b, _ in batches
              for r in range(2) for k in range(1, b["segment_ids"][r].max() + 1)]
  assert len(segments) == 12
  assert set(segments[:6]) == set(segments[6:]) and len(set(segments)) == 6
  assert segments[:6] != segments[6:]


def test_resume_is_exact_at_every_batch(recs, renderer):
  """Save after k batches (JSON round trip), restore into a fresh loader: the rest is identical."""
  cfg = config()
  full = run(recs, renderer, cfg)
  assert len(full) >= 6
  replayed = set()
  for k in range(len(full)):
    it = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
    for _ in range(k):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    replayed.add(state["replay_window"])
    it.close()
    fresh = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
    fresh.set_state(state)
    rest = []
    for batch in fresh:
      rest.append((batch, dict(fresh.metrics)))
    fresh.close()
    assert_same(rest, full[k:])
  # Saved both mid-window (rows of a closed window pending: replayed) and between windows.
  assert replayed == {True, False}


def test_worker_processes_give_the_same_batches_and_resume(recs, renderer):
  full = run(recs, renderer, config())
  cfg = config(num_workers=2)
  it = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
  first = [(next(it), dict(it.metrics)) for _ in range(3)]
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  assert_same(first, full[:3])
  fresh = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
  fresh.set_state(state)
  rest = [(b, dict(fresh.metrics)) for b in fresh]
  fresh.close()
  assert_same(rest, full[3:])


def test_decode_workers_share_the_cores():
  before = cv2.getNumThreads()
  try:
    Ld._init_decode_worker(0, 2)
    assert cv2.getNumThreads() == max(1, os.cpu_count() // 2)
    Ld._init_decode_worker(3, 4 * os.cpu_count())
    assert cv2.getNumThreads() == 1
  finally:
    cv2.setNumThreads(before)


def test_process_shards_cover_the_data_disjointly(recs, renderer):
  cfg = config(mode="prompt", batch_size=2, num_epochs=1, length_buckets=(512, 1024),
               vision_buckets=(128, 256))
  seen = []
  for shard in range(2):
    it = Ld.make_loader(recs, renderer, cfg, shard_index=shard, shard_count=2)
    seen.append([m["index"] for pb in it for m in pb.meta if m is not None])
    it.close()
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(len(recs)))
  assert len(seen[0]) == len(seen[1]) == 3


def test_prompt_mode(recs, renderer):
  cfg = config(mode="prompt", batch_size=4, num_epochs=1, length_buckets=(256, 512),
               vision_buckets=(128,))
  it = Ld.make_loader(recs, renderer, cfg, shard_index=0, shard_count=1)
  batches = list(it)
  it.close()
  assert len(batches) == 2 and [pb.num_real for pb in batches] == [4, 2]
  pb = batches[0]
  assert set(pb.arrays) == set(K.PROMPT_KEYS) and pb.arrays["pixel_values"].shape == (4, 128, 1176)
  assert pb.arrays["input_ids"].shape[1] in (256, 512)
  by_index = {r.index: r for r in recs}
  for b, (answer, meta) in enumerate(zip(pb.answers, pb.meta)):
    assert answer == by_index[meta["index"]].answer
    n = pb.arrays["prompt_lengths"][b]
    assert pb.arrays["segment_ids"][b, :n].all() and not pb.arrays["segment_ids"][b, n:].any()
    assert pb.arrays["next_position"][b] == pb.arrays["positions"][:, b, :n].max() + 1
    assert meta["timestamps"] and meta["second_per_grid"] > 0
  assert batches[1].answers[2:] == [None, None]


def _bad_records(recs, tmp_path):
  """One record per bad-input case, each pointing at a broken file (or text)."""
  empty = tmp_path / "empty.mp4"
  empty.write_bytes(b"")
  garbage = tmp_path / "garbage.mp4"
  garbage.write_bytes(os.urandom(4096))
  one_frame = tmp_path / "one_frame.mp4"
  w = cv2.VideoWriter(str(one_frame), cv2.VideoWriter_fourcc(*"mp4v"), 4, (112, 112))
  w.write(np.zeros((112, 112, 3), np.uint8))
  w.release()
  good = recs[0]
  return [
      dataclasses.replace(good, index=100, video_path=str(tmp_path / "missing.mp4")),
      dataclasses.replace(good, index=101, video_path=str(empty)),
      dataclasses.replace(good, index=102, video_path=str(garbage)),
      dataclasses.replace(good, index=103, video_path=str(one_frame)),
      dataclasses.replace(good, index=104, problem="What is <|im_end|> here?"),
  ]


def test_bad_samples_are_skipped_and_counted(recs, renderer, tmp_path):
  bad = _bad_records(recs, tmp_path)
  batches = run(recs + bad, renderer, config(num_epochs=1, shuffle=False))
  final = batches[-1][1]
  assert final["samples"] == len(recs)
  assert final["skipped_total"] == len(bad)
  assert final["skipped_VideoNotFoundError"] == 1
  assert final["skipped_EmptyVideoFileError"] == 1
  assert final["skipped_SequenceError"] == 1
  # The garbage file and the one-frame video fail as corrupt / too short (the video module's types).
  assert sum(v for k, v in final.items() if k.startswith("skipped_") and k != "skipped_total") == 5
  other = {k for k in final if k.startswith("skipped_")} - {
      "skipped_total", "skipped_VideoNotFoundError", "skipped_EmptyVideoFileError", "skipped_SequenceError"}
  assert other and other <= {f"skipped_{c.__name__}" for c in (
      V.CorruptVideoError, V.NoDecodableFramesError, V.TruncatedVideoError, V.UnsupportedCodecError)}


@pytest.mark.parametrize("case", range(5))
def test_bad_samples_can_be_fatal(recs, renderer, tmp_path, case):
  bad = _bad_records(recs, tmp_path)[case]
  it = Ld.make_loader([recs[1], bad], renderer, config(num_epochs=1, shuffle=False, on_bad_sample="raise",
                                                       prefetch=0), shard_index=0, shard_count=1)
  with pytest.raises(Ld.BadSampleError) as err:
    list(it)
  it.close()
  assert err.value.index == bad.index and err.value.source_file == bad.source_file
  assert f"record {bad.index}" in str(err.value) and err.value.reason


def test_overlong_samples_are_truncated_or_dropped(recs, renderer):
  vision = [S.VisionInput(np.zeros((128, 1176), np.float32), (2, 8, 8), 1.0)]
  full = [renderer.sample(r.problem, r.options, vision, r.completion) for r in recs]
  lengths = sorted(s.num_tokens for s in full)
  seq_len = lengths[len(lengths) // 2]  # about half the samples are longer than a row
  assert max(s.prompt_length for s in full) < seq_len
  too_long = sum(n > seq_len for n in lengths)
  assert 0 < too_long < len(recs)
  kw = dict(num_epochs=1, seq_len=seq_len, vision_capacity=128)
  final = run(recs, renderer, config(overlong="truncate", **kw))[-1][1]
  assert final["samples"] == len(recs) and final["truncated_samples"] == too_long
  assert final["truncated_tokens"] == sum(n - seq_len for n in lengths if n > seq_len)
  final = run(recs, renderer, config(overlong="drop", **kw))[-1][1]
  assert final["samples"] == len(recs) - too_long and final["dropped_too_long"] == too_long
  assert final["truncated_samples"] == 0


def test_config_errors(recs, renderer):
  with pytest.raises(ValueError, match="mode"):
    config(mode="rl")
  with pytest.raises(ValueError, match="on_bad_sample"):
    config(on_bad_sample="ignore")
  with pytest.raises(ValueError, match="shard_index"):
    Ld.make_dataset(recs, renderer, config(), shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="empty"):
    Ld.make_dataset([], renderer, config(), shard_index=0, shard_count=1)
