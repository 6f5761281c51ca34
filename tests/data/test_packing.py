"""Packing invariants (every token once, masks, positions, isolation, vision maps) and prompt batches."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vt_jax.data import packing as K
from vt_jax.data import prompts
from vt_jax.data import sequences as S


@pytest.fixture(scope="module")
def renderer():
  return S.ChatRenderer(S.qwen2_tokenizer(), prompts.get_prompt("plain", system="Be brief."))


def make_sample(renderer, uid, grids, trace_words, prompt_only=False):
  rng = np.random.default_rng(uid)
  vision = []
  for k, (t, h, w) in enumerate(grids):
    # Every patch row carries (sample, item, patch index) so a misplaced patch is caught.
    pv = np.zeros((t * h * w, 1176), np.float32)
    pv[:, 0], pv[:, 1], pv[:, 2] = uid, k, np.arange(t * h * w)
    pv[:, 3:] = rng.standard_normal((t * h * w, 1173))
    vision.append(S.VisionInput(pv, (t, h, w), 0.5 + k))
  trace = None if prompt_only else " ".join(["word"] * trace_words) + " <answer>A</answer>"
  return renderer.sample(f"Question number {uid}?", ["x", "y"], vision, trace, answer="A",
                         meta={"uid": uid})


grid_st = st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 6, 8, 10]), st.sampled_from([2, 4, 6, 12]))
sample_st = st.tuples(st.lists(grid_st, min_size=0, max_size=2), st.integers(1, 60))


def segment_slices(seg):
  out = {}
  for k in np.unique(seg[seg > 0]):
    idx = np.flatnonzero(seg == k)
    assert np.all(np.diff(idx) == 1), "a segment must be contiguous"
    out[int(k)] = slice(idx[0], idx[-1] + 1)
  return out


def check_rows(rows, fitted, spec):
  """Every fitted sample appears exactly once, intact, with consistent vision maps and isolation."""
  by_key = {tuple(s.input_ids.tolist()): s for s in fitted}
  seen = []
  for row in rows:
    assert row["input_ids"].shape == (spec.seq_len,) and row["pixel_values"].shape == (
        spec.vision_capacity, 1176)
    seg = row["segment_ids"]
    slices = segment_slices(seg)
    assert sorted(slices) == list(range(1, len(slices) + 1))
    # Segments come first, padding after; padding carries nothing.
    pad = seg == 0
    assert not pad[:pad.argmax()].any() if pad.any() else True
    assert (row["loss_mask"][pad] == 0).all() and (row["targets"][pad] == 0).all()
    assert (row["vision_token_index"][pad] == -1).all() and (row["positions"][:, pad] == 0).all()
    windows_by_segment = []
    for k, sl in slices.items():
      key = tuple(row["input_ids"][sl].tolist())
      assert key in by_key, "a segment that is not one of the samples"
      s = by_key[key]
      seen.append(key)
      np.testing.assert_array_equal(row["positions"][:, sl], s.positions)  # restart at 0 per segment
      np.testing.assert_array_equal(row["targets"][sl], s.targets)
      np.testing.assert_array_equal(row["loss_mask"][sl], s.loss_mask)
      np.testing.assert_array_equal(row["token_types"][sl], s.token_types)
      assert row["targets"][sl.stop - 1] == 0 and row["loss_mask"][sl.stop - 1] == 0  # nothing crosses
      # Vision: the k-th pad token of item i -> a merged slot whose 4 patches are item i's merged token k.
      vti = row["vision_token_index"][sl]
      assert ((vti >= 0) == (s.token_types > 0)).all()
      slots = vti[vti >= 0]
      offset = 0
      windows = set()
      for i, v in enumerate(s.vision):
        n = v.pixel_values.shape[0] // 4
        item_slots = slots[offset:offset + n]
        offset += n
        patches = (item_slots[:, None] * 4 + np.arange(4)).reshape(-1)
        np.testing.assert_array_equal(row["pixel_values"][patches], v.pixel_values)
        t, h, w = v.grid_thw
        # Temporal group of merged token m is m // (h*w/4): patches of one group share a group id.
        gids = row["vision_group_ids"][patches].reshape(t, -1)
        assert (gids == gids[:, :1]).all() and len(set(gids[:, 0])) == t and (gids > 0).all()
        windows |= set(row["vision_window_ids"][patches].tolist())
      assert offset == slots.shape[0]
      windows_by_segment.append(windows)
    # No vision window or group is shared between segments (the vision tower cannot mix samples).
    for a in range(len(windows_by_segment)):
      for b in range(a + 1, len(windows_by_segment)):
        assert not windows_by_segment[a] & windows_by_segment[b]
    # Buffer slots not used by any item are zero padding with ids 0.
    used = row["vision_window_ids"] > 0
    assert (row["pixel_values"][~used] == 0).all() and (row["vision_group_ids"][~used] == 0).all()
  assert sorted(seen) == sorted(by_key), "every sample exactly once"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(sample_st, min_size=1, max_size=10), bins=st.integers(1, 4),
       overlong=st.sampled_from(["truncate", "drop"]))
def test_packing_invariants(renderer, specs, bins, overlong):
  spec = K.PackingSpec(seq_len=160, vision_capacity=256, window_size=56, overlong=overlong)
  samples = [make_sample(renderer, uid, grids, words) for uid, (grids, words) in enumerate(specs)]
  stats = K.PackingStats(spec.seq_len, spec.vision_capacity)
  rows = K.pack_samples(samples, spec, num_bins=bins, stats=stats)
  check_stats = K.PackingStats()
  fitted = [f for f in (K.fit_sample(s, spec, check_stats) for s in samples) if f is not None]
  check_rows(rows, fitted, spec)
  assert stats.samples == len(fitted) and stats.rows == len(rows)
  assert stats.tokens == sum(f.num_tokens for f in fitted) == int((np.stack(
      [r["segment_ids"] for r in rows]) > 0).sum()) if rows else stats.tokens == 0
  assert stats.samples + stats.dropped_too_long + stats.dropped_vision_overflow == len(samples)
  assert stats.truncated_samples == sum(f.truncated_tokens > 0 for f in fitted)
  if overlong == "drop":
    assert stats.truncated_samples == 0
  assert 0 < stats.token_efficiency <= 1 if rows else True


def test_overlong_policies_are_counted(renderer):
  spec = K.PackingSpec(seq_len=120, vision_capacity=64, window_size=56)
  short = make_sample(renderer, 0, [(1, 4, 4)], 3)
  long = make_sample(renderer, 1, [(1, 4, 4)], 200)
  huge_video = make_sample(renderer, 2, [(2, 8, 8)], 3)  # 2 groups x 4 windows x 16 > 64 slots
  stats = K.PackingStats(120, 64)
  rows = K.pack_samples([short, long, huge_video], spec, stats=stats)
  assert stats.truncated_samples == 1 and stats.truncated_tokens == long.num_tokens - 120
  assert stats.dropped_vision_overflow == 1 and stats.samples == 2
  assert len(rows) == 2  # short + truncated long do not share a 120-token row
  stats = K.PackingStats(120, 64)
  K.pack_samples([short, long], K.PackingSpec(120, 64, window_size=56, overlong="drop"), stats=stats)
  assert stats.dropped_too_long == 1 and stats.truncated_samples == 0 and stats.samples == 1
  # A prompt longer than the row cannot be truncated: dropped even under "truncate".
  stats = K.PackingStats()
  assert K.fit_sample(short, K.PackingSpec(short.prompt_length, 64, window_size=56), stats) is None
  assert stats.dropped_too_long == 1


def test_first_fit_fills_earlier_rows_and_stacks_to_contract_layout(renderer):
  samples = [make_sample(renderer, uid, [(1, 4, 4)], words) for uid, words in enumerate([60, 60, 5])]
  sizes = [s.num_tokens for s in samples]
  L = sizes[0] + sizes[2]  # the third sample exactly fills the first row; the second does not fit there
  spec = K.PackingSpec(seq_len=L, vision_capacity=128, window_size=56)
  rows = K.pack_samples(samples, spec, num_bins=2)
  assert [int(r["segment_ids"].max()) for r in rows] == [2, 1]
  assert (rows[0]["segment_ids"] > 0).all()
  np.testing.assert_array_equal(rows[0]["input_ids"][sizes[0]:], samples[2].input_ids)
  # With one open row, a sample that does not fit closes it.
  assert [int(r["segment_ids"].max()) for r in K.pack_samples(samples, spec, num_bins=1)] == [1, 2]
  batch = K.stack_rows(rows)
  assert batch["positions"].shape == (3, 2, L) and batch["input_ids"].shape == (2, L)
  assert batch["pixel_values"].shape == (2, 128, 1176) and batch["vision_pos_hw"].shape == (2, 128, 2)
  assert set(batch) == set(K.ROW_KEYS)
  dtypes = {k: v.dtype for k, v in batch.items()}
  assert dtypes["loss_mask"] == np.float32 and dtypes["pixel_values"] == np.float32
  assert all(dtypes[k] == np.int32 for k in K.ROW_KEYS if k not in ("loss_mask", "pixel_values"))


def test_vision_slots_match_layout():
  from vt_jax.model.vision_layout import build_vision_layout
  for window_size in (56, 112):
    spec = K.PackingSpec(64, 1024, window_size=window_size)
    for grids in ([(2, 8, 8)], [(3, 6, 10), (1, 2, 2)], [(8, 20, 26)]):
      assert K.vision_slots(grids, spec) == build_vision_layout(grids, window_size=window_size).capacity


def test_prompt_batches(renderer):
  spec = K.PackingSpec(seq_len=512, vision_capacity=64, window_size=56)
  samples = [make_sample(renderer, uid, [(1, 4, 4)] * (1 + uid % 2), 0, prompt_only=True)
             for uid in range(3)]
  longest = max(s.num_tokens for s in samples)
  pb = K.batch_prompts(samples, spec, length_buckets=[longest - 1, longest + 7, 512],
                       vision_buckets=[16, 32, 64], batch_size=4)
  a = pb.arrays
  assert a["input_ids"].shape == (4, longest + 7)
  # Two (1, 4, 4) items at window 56 take 2 windows of 16 patch slots.
  assert a["pixel_values"].shape == (4, 32, 1176) and a["positions"].shape == (3, 4, longest + 7)
  assert set(a) == set(K.PROMPT_KEYS)
  assert a["prompt_lengths"].tolist() == [s.prompt_length for s in samples] + [0]
  assert a["next_position"].tolist() == [s.next_position for s in samples] + [0]
  for b, s in enumerate(samples):
    n = s.num_tokens
    np.testing.assert_array_equal(a["input_ids"][b, :n], s.input_ids)
    assert (a["segment_ids"][b, :n] == 1).all() and (a["segment_ids"][b, n:] == 0).all()
    np.testing.assert_array_equal(a["positions"][:, b, :n], s.positions)
  assert (a["segment_ids"][3] == 0).all()
  assert pb.answers == ["A", "A", "A", None] and pb.meta[1] == {"uid": 1} and pb.num_real == 3
  with pytest.raises(K.PackingError, match="exceeds the largest bucket"):
    K.batch_prompts(samples, spec, length_buckets=[32])
  with pytest.raises(K.PackingError, match="prompt-only"):
    K.batch_prompts([make_sample(renderer, 9, [], 3)], spec, length_buckets=[512])


def test_spec_errors():
  with pytest.raises(K.PackingError, match="multiple of window_patches=64"):
    K.PackingSpec(128, 100)
  with pytest.raises(K.PackingError, match="overlong"):
    K.PackingSpec(128, 64, overlong="wrap")
