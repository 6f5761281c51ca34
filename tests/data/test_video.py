"""Frames as Qwen2.5-VL sees them: formulas, patch layout vs transformers, pixels vs the torch
reference resize, decoding strategies, and every bad-input error."""

import dataclasses
import math
import os
import struct

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from vt_jax.data import video as V

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


# ---------------------------------------------------------------------------------------------
# Independent reference formulas (written from the qwen-vl-utils description, not our code)
# ---------------------------------------------------------------------------------------------
def ref_smart_resize(h, w, factor, lo, hi):
  hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
  if hb * wb > hi:
    b = math.sqrt(h * w / hi)
    return max(factor, math.floor(h / b / factor) * factor), max(factor, math.floor(w / b / factor) * factor)
  if hb * wb < lo:
    b = math.sqrt(lo / (h * w))
    return math.ceil(h * b / factor) * factor, math.ceil(w * b / factor) * factor
  return hb, wb


def ref_indices(total, fps, nframes=None, target_fps=None, start=None, end=None):
  s, e = 0, total - 1
  if start is not None or end is not None:
    dur = total / fps
    s = 0 if start is None else math.ceil(min(max(start, 0), dur) * fps)
    if end is not None:
      e = min(math.floor(min(max(end, 0), dur) * fps), total - 1)
  window = e - s + 1
  if nframes is not None:
    n = round(nframes / 2) * 2
  else:
    f = 2.0 if target_fps is None else target_fps
    n = window / fps * f
    n = min(max(n, 4), math.floor(min(768, window) / 2) * 2, window)
    n = math.floor(n / 2) * 2
  return [int(x) for x in torch.linspace(s, e, n, dtype=torch.float64).round().tolist()], window


def torch_reference_resize(frames_uint8, h, w):
  """What qwen-vl-utils does: torchvision bicubic+antialias on uint8 (float math, clamp, round)."""
  x = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float()
  y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True,
                                      align_corners=False)
  return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def textured_frames(t, h, w, seed=0):
  """Blurred noise + solid shapes + text: smooth areas and hard edges."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (t, h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
  out = np.stack([cv2.resize(f, (w, h), interpolation=cv2.INTER_CUBIC) for f in base])
  for i, f in enumerate(out):
    cv2.circle(f, (w // 3 + i, h // 2), h // 5, (255, 30, 30), -1)
    cv2.putText(f, f"ab{i}", (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, h / 160, (255, 255, 255), 1)
  return out


# ---------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 4000), w=st.integers(1, 4000),
       lo=st.sampled_from([4 * 784, 56 * 56, 128 * 784, 256 * 784]),
       hi=st.sampled_from([128 * 784, 768 * 784, 1280 * 784, 16384 * 784]))
def test_smart_resize_matches_reference(h, w, lo, hi):
  if max(h, w) / min(h, w) > 200:
    with pytest.raises(ValueError, match="aspect ratio"):
      V.smart_resize(h, w, 28, lo, hi)
    return
  got = V.smart_resize(h, w, 28, lo, hi)
  assert got == ref_smart_resize(h, w, 28, lo, hi)
  assert got[0] % 28 == 0 and got[1] % 28 == 0


def test_smart_resize_known_values():
  # 16:9 at Video-Thinker's budget: 224 x 420 = 94,080 px <= 100,352.
  assert V.smart_resize(720, 1280, 28, 128 * 784, 128 * 784) == (224, 420)
  # Below min_pixels the image grows (qwen-vl-utils's min for videos is also 128*28*28).
  assert V.smart_resize(112, 112, 28, 128 * 784, 128 * 784) == (336, 336)
  assert V.smart_resize(112, 112, 28, 112 * 112, 112 * 112) == (112, 112)
  with pytest.raises(ValueError):
    V.smart_resize(10, 2100)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(2, 20000), fps=st.sampled_from([1.0, 4.0, 23.976, 25.0, 29.97, 30.0, 60.0]),
       nframes=st.sampled_from([None, 2, 4, 15, 16, 17, 32, 64]),
       target_fps=st.sampled_from([None, 0.5, 1.0, 2.0, 4.0]),
       start=st.one_of(st.none(), st.floats(0, 200)), end=st.one_of(st.none(), st.floats(0, 900)))
def test_sample_frame_indices_matches_reference(total, fps, nframes, target_fps, start, end):
  sampling = V.VideoSampling(nframes=nframes, fps=None if nframes else target_fps, start=start,
                             end=end)
  try:
    ref, window = ref_indices(total, fps, nframes, None if nframes else target_fps, start, end)
    ref_ok = 2 <= len(ref) <= window and (start is None and end is None or ref[0] < ref[-1] or
                                          window > 1)
  except Exception:
    ref_ok = False
  dur = total / fps
  s = 0 if start is None else math.ceil(min(max(start, 0), dur) * fps)
  e = total - 1 if end is None else min(math.floor(min(max(end, 0), dur) * fps), total - 1)
  if (start is not None or end is not None) and s >= e:
    ref_ok = False
  if not ref_ok:
    with pytest.raises(ValueError):
      V.sample_frame_indices(total, fps, sampling)
    return
  got = V.sample_frame_indices(total, fps, sampling)
  assert got.dtype == np.int64
  assert got.tolist() == ref
  assert np.all(np.diff(got) >= 1)  # strictly increasing: n <= window


def test_sample_frame_indices_known_values():
  # Video-Thinker: 16 uniformly sampled frames.
  got = V.sample_frame_indices(300, 30.0, V.VideoSampling())
  assert got.tolist() == np.round(np.linspace(0, 299, 16)).astype(int).tolist()
  # fps mode: 60 s at 30 fps, 2 fps -> 120 frames; 1 s video -> clamp to 4 frames.
  assert len(V.sample_frame_indices(1800, 30.0, V.VideoSampling(nframes=None))) == 120
  assert len(V.sample_frame_indices(30, 30.0, V.VideoSampling(nframes=None))) == 4
  # nframes 15 -> rounded to 16; window [2 s, 4 s] at 10 fps = frames 20..40.
  got = V.sample_frame_indices(100, 10.0, V.VideoSampling(nframes=15, start=2.0, end=4.0))
  assert len(got) == 16 and got[0] == 20 and got[-1] == 40
  with pytest.raises(ValueError, match="exclusive"):
    V.VideoSampling(nframes=16, fps=2.0)


@pytest.mark.parametrize("nframes,lo,hi,total,expect", [
    (16, 128 * 784, 128 * 784, V.VIDEO_TOTAL_PIXELS, 128 * 784),       # Video-Thinker
    (16, 128 * 784, None, V.VIDEO_TOTAL_PIXELS, 768 * 784),            # default cap
    (768, 128 * 784, None, V.VIDEO_TOTAL_PIXELS, V.VIDEO_TOTAL_PIXELS / 768 * 2),
    (768, 128 * 784, None, 10_000, int(128 * 784 * 1.05)),             # floor at 1.05*min
    (16, 128 * 784, 10**9, V.VIDEO_TOTAL_PIXELS, 768 * 784),            # caller can only lower
])
def test_video_pixel_budget(nframes, lo, hi, total, expect):
  s = V.VideoSampling(min_pixels=lo, max_pixels=hi, total_pixels=total)
  assert V.video_max_pixels(nframes, s) == expect


# ---------------------------------------------------------------------------------------------
# Patch layout
# ---------------------------------------------------------------------------------------------
def test_patchify_matches_transformers_image_processor():
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
  img = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
  hf = Qwen2VLImageProcessorPil()(images=[img], do_resize=False, return_tensors="np")
  pv, grid = V.patchify(V.normalize(img[None]))
  assert grid.tolist() == hf["image_grid_thw"][0].tolist() == [1, 4, 6]
  np.testing.assert_allclose(pv, hf["pixel_values"], atol=2e-6, rtol=0)


def test_patchify_rows_are_conv3d_patches_in_merge_order():
  """Each row, viewed as (C, tp, p, p), must be the Conv3d patch the model embeds, and rows must
  come in 2x2 merge-block order (the order HF's Qwen2VLVideoProcessor.patchify produces)."""
  rng = np.random.default_rng(2)
  t, h, w = 5, 56, 84  # odd T exercises last-frame padding
  frames = rng.normal(size=(t, h, w, 3)).astype(np.float32)
  pv, grid = V.patchify(frames)
  gt, gh, gw = grid.tolist()
  assert (gt, gh, gw) == (3, 4, 6)
  padded = np.concatenate([frames, frames[-1:]], 0)
  video = torch.from_numpy(padded).permute(3, 0, 1, 2)[None]  # [1, C, T, H, W]
  weight = torch.from_numpy(rng.normal(size=(7, 3, 2, 14, 14)).astype(np.float32))
  conv = torch.nn.functional.conv3d(video, weight, stride=(2, 14, 14))[0]  # [7, gt, gh, gw]
  emb = torch.from_numpy(pv).view(-1, 3, 2, 14, 14).flatten(1) @ weight.flatten(1).T
  expect = []
  for it in range(gt):
    for bh in range(gh // 2):
      for bw in range(gw // 2):
        for mh in range(2):
          for mw in range(2):
            expect.append(conv[:, it, 2 * bh + mh, 2 * bw + mw])
  torch.testing.assert_close(emb, torch.stack(expect), atol=1e-3, rtol=1e-4)


def test_pixel_values_equals_patchify_of_normalize_bit_for_bit():
  # The loaders' fast path (transpose uint8, normalise the rows) must give exactly the two-step result.
  frames = np.random.default_rng(3).integers(0, 256, (5, 56, 84, 3), dtype=np.uint8)  # odd T: padding
  got, grid = V.pixel_values(frames)
  want, want_grid = V.patchify(V.normalize(frames))
  assert got.dtype == np.float32 and grid.tolist() == want_grid.tolist() == [3, 4, 6]
  np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="uint8"):
    V.pixel_values(frames.astype(np.float32))


def test_patchify_rejects_bad_sizes():
  with pytest.raises(ValueError, match="multiples of 28"):
    V.patchify(np.zeros((2, 30, 28, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# Resize vs the torch reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((90, 120), (112, 140)), ((200, 360), (112, 196)),
                                     ((64, 64), (140, 140)), ((150, 100), (112, 84))])
def test_resize_exact_matches_torch_reference(src, dst):
  frames = textured_frames(3, *src)
  ref = torch_reference_resize(frames, *dst)
  got = V.resize_frames(frames, *dst, method="exact")
  diff = np.abs(got.astype(int) - ref.astype(int))
  assert diff.max() <= 1  # one uint8 level where float order decides a .5 tie
  assert (diff > 0).mean() < 2e-3


@pytest.mark.parametrize("src,dst", [((200, 360), (112, 196)), ((64, 64), (140, 140))])
def test_resize_opencv_within_documented_bound(src, dst):
  frames = textured_frames(3, *src)
  ref = V.normalize(torch_reference_resize(frames, *dst))
  got = V.normalize(V.resize_frames(frames, *dst, method="opencv"))
  diff = np.abs(got - ref)
  assert diff.max() < 0.6 and diff.mean() < 0.04  # module docstring: <= 0.511 / 0.031


# ---------------------------------------------------------------------------------------------
# Real files
# ---------------------------------------------------------------------------------------------
def _frame(i, h, w):
  img = np.full((h, w, 3), 30, np.uint8)
  x = (i * 3) % (w - 20)
  img[h // 4:h // 4 + 20, x:x + 20] = ((i * 37) % 256, 255 - (i * 11) % 256, 200)
  cv2.putText(img, str(i), (4, h - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)
  return img


def write_mp4v(path, n, fps, h=96, w=128):
  vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
  for i in range(n):
    vw.write(np.ascontiguousarray(_frame(i, h, w)[..., ::-1]))
  vw.release()
  return str(path)


def write_pyav(path, n, fps, codec="libx264", h=96, w=128, faststart=False, x264=None,
               cuts=False, container=None, pix_fmt="yuv420p"):
  """x264: x264-params ("keyint=30:open-gop=1"), or x265-params for libx265; cuts: invert every
  37th frame (scene cuts)."""
  av = pytest.importorskip("av")
  c = av.open(str(path), "w", format=container, options={"movflags": "faststart"} if faststart else {})
  s = c.add_stream(codec, rate=fps)
  s.width, s.height, s.pix_fmt = w, h, pix_fmt
  if x264:
    s.options = {"x264-params": x264} if codec == "libx264" else {"x265-params": x264 + ":log-level=error"}
  for i in range(n):
    img = _frame(i, h, w)
    if cuts and i % 37 == 20:
      img = 255 - img
    for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
      c.mux(p)
  for p in s.encode():
    c.mux(p)
  c.close()
  return str(path)


def decode_all(path):
  cap = cv2.VideoCapture(path)
  out = []
  while True:
    ok, f = cap.read()
    if not ok:
      return np.stack(out)[..., ::-1]
    out.append(f)


def test_load_video_geometry_indices_timestamps_pixels(tmp_path):
  path = write_mp4v(tmp_path / "v.mp4", n=90, fps=10)
  s = V.VideoSampling(nframes=16, min_pixels=112 * 112, max_pixels=112 * 140)
  v = V.load_video(path, s, keep_uint8=True)
  idx = np.round(np.linspace(0, 89, 16)).astype(int)
  assert v.frame_indices.tolist() == idx.tolist()
  np.testing.assert_array_equal(v.timestamps, idx / 10.0)
  assert (v.video_fps, v.total_frames) == (10.0, 90)
  assert v.sampled_fps == pytest.approx(16 / 90 * 10)
  assert v.second_per_grid == pytest.approx(2 / (16 / 90 * 10))
  h, w = V.smart_resize(96, 128, 28, 112 * 112, 112 * 140)
  assert v.grid_thw.tolist() == [8, h // 14, w // 14]
  assert v.pixel_values.shape == (8 * h * w // 196, 1176) and v.pixel_values.dtype == np.float32
  # Pixels: the same decoded frames through the torch reference resize + normalise + patchify.
  ref_frames = torch_reference_resize(np.ascontiguousarray(decode_all(path)[idx]), h, w)
  assert np.abs(v.frames_uint8.astype(int) - ref_frames.astype(int)).max() <= 1
  ref_pv, _ = V.patchify(((ref_frames / 255.0 - MEAN) / STD).astype(np.float32))
  assert np.abs(v.pixel_values - ref_pv).max() <= 0.016  # one uint8 level / min(std)


def test_decode_strategies_agree_and_are_exact(tmp_path):
  for path in (write_mp4v(tmp_path / "m.mp4", 120, 30), write_pyav(tmp_path / "h.mp4", 120, 30)):
    every = decode_all(path)
    assert len(every) == 120
    idx = [0, 3, 40, 41, 90, 119, 7, 40]  # unsorted with a repeat
    for strategy in ("seek", "grab", "auto") + (("refs",) if path.endswith("h.mp4") else ()):
      np.testing.assert_array_equal(V.decode_frames(path, idx, strategy=strategy), every[idx])


def _cut(src, dst, at):
  """Stream-copy `src` from display rank `at` into `dst` as ffmpeg -ss -c copy does: from the
  keyframe before `at`, with timestamps shifted so that `at` is 0 (the mp4 muxer then writes an
  edit list hiding the frames before it)."""
  av = pytest.importorskip("av")
  with av.open(src) as i, av.open(dst, "w") as o:
    si = i.streams.video[0]
    so = o.add_stream_from_template(si)
    packets = [p for p in i.demux(si) if p.size]
    t0 = sorted(p.pts for p in packets)[at]
    first = max(k for k, p in enumerate(packets) if p.is_keyframe and p.pts <= t0)
    for p in packets[first:]:
      p.pts -= t0
      p.dts -= t0
      p.stream = so
      o.mux(p)
  return dst


REFS_STREAMS = {  # x264 settings that change which pictures are references and where IDRs fall
    "b_pyramid": "keyint=30:min-keyint=30",
    "open_gop": "keyint=30:open-gop=1",
    "no_bframes": "bframes=0:keyint=40",
    "b_not_referenced": "b-pyramid=none:keyint=50",
    "four_slices": "slices=4:keyint=60",
    "one_idr": "keyint=1000:scenecut=0",
    "fake_interlaced": "fake-interlaced=1:keyint=30",  # interlaced coding allowed, frames coded
    "strict_pyramid": "keyint=30:b-pyramid=strict:bframes=5",
    "sixteen_refs": "keyint=40:bframes=16:ref=16",
    "high444": "keyint=30",  # written as yuv444p: High 4:4:4 (chroma_format_idc 3 in the SPS)
    # HEVC (x265): IDR periods; open GOP (CRA pictures, one IDR); three temporal layers, where
    # sub-layer non-reference pictures of layer 1 are referenced from layer 2.
    "hevc_closed_gop": "keyint=30:open-gop=0",
    "hevc_open_gop": "keyint=30",
    "hevc_temporal_layers": "keyint=30:open-gop=0:temporal-layers=3",
}


@pytest.mark.parametrize("name", sorted(REFS_STREAMS) + ["matroska", "odd_size"])
def test_refs_decodes_exactly_the_frames_of_the_plain_decode(tmp_path, name):
  if name == "matroska":
    path = write_pyav(tmp_path / "v.mkv", 150, 30, x264="keyint=30", cuts=True)
  elif name == "odd_size":
    path = write_pyav(tmp_path / "v.mp4", 150, 30, h=90, w=126, x264="keyint=25", cuts=True)
  else:
    path = write_pyav(tmp_path / "v.mp4", 150, 30, x264=REFS_STREAMS[name], cuts=True,
                      pix_fmt="yuv444p" if name == "high444" else "yuv420p",
                      codec="libx265" if name.startswith("hevc") else "libx264")
  every = decode_all(path)
  assert len(every) == 150
  for idx in ([0, 3, 40, 41, 90, 119, 7, 40, 149], [5, 61, 62, 100], [149]):
    np.testing.assert_array_equal(V.decode_frames(path, idx, strategy="refs"), every[idx])
    np.testing.assert_array_equal(V.decode_frames(path, idx, strategy="auto"), every[idx])
  parse = V._hevc_access_unit if name.startswith("hevc") else V._h264_access_unit
  plan = V._plan_refs(path, np.array([0, 40, 100]), parse)
  packets, output = plan.packets, plan.output
  assert output == sorted(output) and {0, 40, 100} <= set(output) and plan.periods[0] == 0
  if name in ("b_pyramid", "b_not_referenced", "hevc_closed_gop"):  # non-references, periods skipped
    assert len(packets) < 101 // 2


def test_plan_keeps_non_references_a_higher_temporal_layer_may_use(tmp_path):
  # HEVC sub-layer non-reference pictures may be referenced from higher temporal layers; x265's
  # layered streams do not do it, so the rule is checked on a parser that puts H.264's reference
  # pictures on layer 1 above its non-reference ones on layer 0.
  path = write_pyav(tmp_path / "v.mp4", 150, 30, x264=REFS_STREAMS["b_pyramid"], cuts=True)
  layered = lambda data: (lambda n, t, i, s: (n, 0 if n else 1, i, s))(*V._h264_access_unit(data))
  wanted = np.array([0, 40, 100])
  flat = V._plan_refs(path, wanted).packets
  layered_plan = V._plan_refs(path, wanted, layered)
  kept, output = layered_plan.packets, layered_plan.output
  assert len(flat) < len(kept) == len(output)
  # Nothing dropped: every packet of the IDR periods holding 0, 40 and 100 up to the last wanted one
  # (counted here from PyAV's demuxer: keyframes are this stream's IDRs).
  av = pytest.importorskip("av")
  with av.open(path) as c:
    packets = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size]
  rank = {pts: r for r, pts in enumerate(sorted(p[0] for p in packets))}
  period = np.cumsum([key for _, key in packets])
  expected = 0
  for g in np.unique(period):
    members = [d for d in range(len(packets)) if period[d] == g]
    hit = [d for d in members if rank[packets[d][0]] in wanted]
    expected += hit[-1] - members[0] + 1 if hit else 0
  assert len(kept) == expected
  np.testing.assert_array_equal(V.decode_frames(path, wanted, strategy="refs"), decode_all(path)[wanted])


def test_load_video_decodes_with_the_sampling_strategy(tmp_path, monkeypatch):
  path = write_pyav(tmp_path / "v.mp4", 150, 30, x264=REFS_STREAMS["b_pyramid"], cuts=True)
  used = []
  decode = V.decode_frames
  monkeypatch.setattr(V, "decode_frames", lambda *a, **k: used.append(k["strategy"]) or decode(*a, **k))
  s = V.VideoSampling(nframes=8, min_pixels=56 * 56, max_pixels=56 * 56)
  out = {d: V.load_video(path, dataclasses.replace(s, decode=d)).pixel_values
         for d in ("auto", "seek", "refs")}
  assert used == ["auto", "seek", "refs"]
  np.testing.assert_array_equal(out["auto"], out["seek"])
  np.testing.assert_array_equal(out["refs"], out["seek"])
  with pytest.raises(ValueError, match="decode must be"):
    V.VideoSampling(decode="fast")


def test_auto_takes_refs_only_where_it_decodes_fewer_pictures(tmp_path):
  idr_periods = write_pyav(tmp_path / "a.mp4", 150, 30, x264=REFS_STREAMS["b_pyramid"], cuts=True)
  open_gop = write_pyav(tmp_path / "b.mp4", 150, 30, x264=REFS_STREAMS["open_gop"], cuts=True)
  wanted = np.array([0, 149])
  # IDR every 30 frames: frame 149 needs its period's references only.
  assert len(V._plan_refs(idr_periods, wanted, cheaper_only=True).packets) < 30
  # One IDR: the plan decodes the references of the whole stream, a seek from the last keyframe
  # (an open-GOP I picture) far fewer.
  assert len(V._plan_refs(open_gop, wanted).packets) > 60
  assert V._plan_refs(open_gop, wanted, cheaper_only=True) is None
  np.testing.assert_array_equal(V.decode_frames(open_gop, wanted), decode_all(open_gop)[wanted])
  V.REFS_MAX_PERIOD_PACKETS, saved = 100, V.REFS_MAX_PERIOD_PACKETS
  try:  # a period past the bound stops the demux pass
    assert V._plan_refs(idr_periods, wanted, cheaper_only=True) is not None
    assert V._plan_refs(write_pyav(tmp_path / "c.mp4", 150, 30, x264=REFS_STREAMS["one_idr"]),
                             wanted, cheaper_only=True) is None
  finally:
    V.REFS_MAX_PERIOD_PACKETS = saved


def test_refs_declines_streams_it_cannot_map(tmp_path):
  src = write_pyav(tmp_path / "src.mp4", 150, 30, x264="keyint=30:min-keyint=30", cuts=True)
  declined = {
      # A stream-copy cut: the edit list hides the frames between the keyframe and the cut.
      "cut": _cut(src, str(tmp_path / "cut.mp4"), at=45),
      "mp4v": write_mp4v(tmp_path / "m.mp4", 60, 30),
  }
  assert V._mp4_shows_every_sample(src) and not V._mp4_shows_every_sample(declined["cut"])
  for name, path in declined.items():
    every = decode_all(path)
    if name == "cut":
      assert len(every) == 105 and np.array_equal(every[0], decode_all(src)[45])
    idx = [0, 1, 20, len(every) - 1]
    with pytest.raises(ValueError, match="'refs' does not apply"):
      V.decode_frames(path, idx, strategy="refs")
    np.testing.assert_array_equal(V.decode_frames(path, idx, strategy="auto"), every[idx], name)


def test_interlaced_h264_is_refused_not_returned_as_garbage(tmp_path):
  # OpenCV 5.0's FFmpeg cannot convert frames flagged interlaced (field macroblock pairs here) and
  # returns uninitialised buffers; the SPS is read from the mp4's avcC and, in MPEG-TS, in band.
  for path in (write_pyav(tmp_path / "i.mp4", 30, 30, x264="interlaced=1:keyint=30"),
               write_pyav(tmp_path / "i.ts", 30, 30, x264="interlaced=1:keyint=30", container="mpegts")):
    for strategy in ("auto", "refs", "grab"):
      with pytest.raises(V.UnsupportedCodecError, match="interlaced H.264"):
        V.decode_frames(path, [0, 10], strategy=strategy)
    with pytest.raises(V.UnsupportedCodecError, match="deinterlace"):
      V.load_video(path, V.VideoSampling(nframes=4))
  progressive = write_pyav(tmp_path / "p.ts", 30, 30, x264="keyint=30", container="mpegts")
  np.testing.assert_array_equal(V.decode_frames(progressive, [0, 29]), decode_all(progressive)[[0, 29]])


class _BitWriter:
  """Exp-Golomb bit writer (the encoder's side of H.264 7.2), for hand-made parameter sets."""

  def __init__(self):
    self.bits = []

  def u(self, n, v):
    self.bits += [(v >> (n - 1 - i)) & 1 for i in range(n)]

  def ue(self, v):
    n = (v + 1).bit_length()
    self.u(n - 1, 0)
    self.u(n, v + 1)

  def se(self, v):
    self.ue(2 * v - 1 if v > 0 else -2 * v)

  def nal(self, header):
    self.bits += [1] + [0] * (-(len(self.bits) + 1) % 8)  # rbsp_stop_one_bit + alignment
    rbsp = bytes(int("".join(map(str, self.bits[i:i + 8])), 2) for i in range(0, len(self.bits), 8))
    out, zeros = bytearray([header]), 0
    for byte in rbsp:  # emulation prevention: no 00 00 0x (x <= 3) in the payload
      if zeros >= 2 and byte <= 3:
        out.append(3)
        zeros = 0
      out.append(byte)
      zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


@pytest.mark.parametrize("frame_mbs_only,mbaff", [(True, False), (False, True), (False, False)])
def test_h264_sps_parse_through_scaling_lists_and_poc_type_1(frame_mbs_only, mbaff):
  w = _BitWriter()
  w.u(8, 100), w.u(8, 0), w.u(8, 30), w.ue(0)  # High profile, constraints, level, sps id
  w.ue(1), w.ue(0), w.ue(0), w.u(1, 0)  # 4:2:0, 8-bit luma / chroma, no transform bypass
  w.u(1, 1)  # seq_scaling_matrix_present_flag
  for i in range(8):
    w.u(1, i in (0, 6))
    if i == 0:  # a 4x4 list: deltas until nextScale hits 0 (the rest repeat the last scale)
      for delta in (8, -3, 0, -13):
        w.se(delta)
    elif i == 6:  # an 8x8 list written in full
      for j in range(64):
        w.se(1 if j % 2 else -1)
  w.ue(2)  # log2_max_frame_num_minus4
  w.ue(1), w.u(1, 0), w.se(-2), w.se(5), w.ue(3), w.se(1), w.se(-1), w.se(0)  # POC type 1
  w.ue(4), w.u(1, 0), w.ue(39), w.ue(29)  # refs, gaps, width / height in macroblocks - 1
  w.u(1, frame_mbs_only)
  if not frame_mbs_only:
    w.u(1, mbaff)
  w.u(1, 1)  # direct_8x8_inference_flag
  sps = w.nal(0x67)
  assert V._h264_sps(sps) == (frame_mbs_only, mbaff, 6, False)


def test_fps_mode_and_window(tmp_path):
  path = write_mp4v(tmp_path / "v.mp4", n=100, fps=10)
  v = V.load_video(path, V.VideoSampling(nframes=None, fps=2.0, start=2.0, end=6.0,
                                         min_pixels=56 * 56, max_pixels=56 * 56))
  assert v.frame_indices.tolist() == np.round(np.linspace(20, 60, 8)).astype(int).tolist()
  assert v.sampled_fps == pytest.approx(8 / 41 * 10)
  assert v.grid_thw.tolist()[0] == 4


def test_load_image_matches_patchify_of_reference_pixels(tmp_path):
  img = textured_frames(1, 90, 150)[0]
  path = str(tmp_path / "x.png")
  cv2.imwrite(path, img[..., ::-1])
  out = V.load_image(path)
  h, w = V.smart_resize(90, 150, 28, 56 * 56, 28 * 28 * 1280)
  assert out.grid_thw.tolist() == [1, h // 14, w // 14]
  ref, _ = V.patchify(V.normalize(torch_reference_resize(img[None], h, w)))
  assert np.abs(out.pixel_values - ref).max() <= 0.016


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def _top_level_boxes(data):
  off, boxes = 0, []
  while off + 8 <= len(data):
    size, kind = struct.unpack(">I4s", data[off:off + 8])
    boxes.append((kind.decode("latin-1"), off, size))
    if size < 8:
      break
    off += size
  return boxes


def test_missing_empty_directory_and_garbage(tmp_path):
  with pytest.raises(V.VideoNotFoundError, match="does not exist"):
    V.load_video(tmp_path / "nope.mp4")
  with pytest.raises(V.VideoNotFoundError, match="not a regular file"):
    V.load_video(tmp_path)
  (tmp_path / "zero.mp4").write_bytes(b"")
  with pytest.raises(V.EmptyVideoFileError, match="0 bytes"):
    V.load_video(tmp_path / "zero.mp4")
  (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(V.CorruptVideoError) as e:
    V.load_video(tmp_path / "junk.mp4")
  assert e.value.path.endswith("junk.mp4") and "cannot open" in e.value.reason
  assert isinstance(e.value, V.VideoError)


def test_truncated_without_index_is_corrupt(tmp_path):
  path = write_mp4v(tmp_path / "v.mp4", 60, 10)  # mp4v via OpenCV: index (moov) at the end
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) // 2])
  with pytest.raises(V.CorruptVideoError):
    V.load_video(path)


def test_overreported_frame_count_resamples_or_raises(tmp_path):
  path = write_pyav(tmp_path / "v.mp4", 200, 20, faststart=True)  # index first, then data
  data = open(path, "rb").read()
  open(path, "wb").write(data[:int(len(data) * 0.55)])
  assert V.probe_video(path).total_frames == 200  # the container still claims 200
  real = len(decode_all(path))
  assert 16 <= real < 200
  v = V.load_video(path, V.VideoSampling(min_pixels=56 * 56, max_pixels=56 * 56))
  assert v.total_frames == real
  assert v.frame_indices.tolist() == np.round(np.linspace(0, real - 1, 16)).astype(int).tolist()
  with pytest.raises(V.TruncatedVideoError) as e:
    V.load_video(path, on_truncated="raise")
  assert e.value.decodable_frames == real and "truncated" in e.value.reason
  with pytest.raises(V.TruncatedVideoError):
    V.decode_frames(path, [0, real + 5])


def test_zero_decodable_frames(tmp_path):
  path = write_pyav(tmp_path / "v.mp4", 60, 10, faststart=True)
  data = open(path, "rb").read()
  mdat = [b for b in _top_level_boxes(data) if b[0] == "mdat"][0]
  open(path, "wb").write(data[:mdat[1] + 16])  # header intact, no sample data
  with pytest.raises(V.NoDecodableFramesError, match="no frame decodes"):
    V.load_video(path)


def test_too_few_frames_for_requested_sampling(tmp_path):
  path = write_mp4v(tmp_path / "v.mp4", 10, 10)
  with pytest.raises(V.TruncatedVideoError, match="cannot sample"):
    V.load_video(path, V.VideoSampling(nframes=16))


def test_av1_is_unsupported(tmp_path):
  av = pytest.importorskip("av")
  if "libsvtav1" not in av.codecs_available and "libaom-av1" not in av.codecs_available:
    pytest.skip("this PyAV build has no AV1 encoder, so no AV1 file can be written")
  codec = "libsvtav1" if "libsvtav1" in av.codecs_available else "libaom-av1"
  path = write_pyav(tmp_path / "v.mp4", 30, 10, codec=codec)
  with pytest.raises(V.UnsupportedCodecError, match="AV1"):
    V.load_video(path)


def test_bad_image(tmp_path):
  (tmp_path / "x.png").write_bytes(b"not a png at all")
  with pytest.raises(V.ImageError, match="cannot decode"):
    V.load_image(tmp_path / "x.png")
  with pytest.raises(V.ImageError, match="does not exist"):
    V.load_image(tmp_path / "y.png")
