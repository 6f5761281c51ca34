"""The trace page: thumbnails written and referenced per `<time>` window; rendered by headless Chromium."""
import os
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from vt_jax.eval.html import frames_in_window, render_trace_html

# 8 frames 2 s apart, each a flat, saturated colour (RGB) so a screenshot shows which thumbnails rendered.
COLOURS = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230), (140, 60, 200),
           (250, 140, 20), (120, 120, 120)]
TIMESTAMPS = np.arange(8) * 2.0 + 0.5
TRACE = ("<time>00:00-00:03</time> <caption>A red frame, then a green one.</caption> <think>Warm first.</think> "
         "Hmm, later.\n<time>00:10-00:13</time> <caption>Purple & orange > blue.</caption> "
         "<think>Cool colours.</think>\n<time>00:40-00:45</time> <caption>Past the end.</caption> "
         "<think>Nothing sampled.</think>\n<time>soon</time> The answer is B. <answer>B</answer>")


def _frames():
  return np.stack([np.full((48, 64, 3), c, np.uint8) for c in COLOURS])


def test_frames_in_window():
  np.testing.assert_array_equal(frames_in_window(TIMESTAMPS, 0, 3), [0, 1])
  np.testing.assert_array_equal(frames_in_window(TIMESTAMPS, 10.5, 12.5), [5, 6])   # bounds inclusive
  assert frames_in_window(TIMESTAMPS, 40, 45).size == 0


def test_page_references_existing_thumbnails(tmp_path):
  out = render_trace_html("Which colour comes first?", ["A. green", "B. red"], TRACE, _frames(), TIMESTAMPS,
                          str(tmp_path / "trace.html"))
  page = open(out, encoding="utf-8").read()
  srcs = re.findall(r'<img src="([^"]+)"', page)
  assert srcs and all(s.startswith("trace_files/") for s in srcs)
  for s in set(srcs):
    img = cv2.imread(str(tmp_path / s))
    assert img is not None and img.shape[1] == 192                       # a real JPEG thumbnail
  cards = page.split('<div class="clue">')[1:]
  assert len(cards) == 3                                                  # 3 parsable windows, 'soon' is not
  assert re.findall(r'src="trace_files/(frame_\d+)\.jpg"', cards[0]) == ["frame_000", "frame_001"]
  assert "A red frame, then a green one." in cards[0]
  assert re.findall(r'src="trace_files/(frame_\d+)\.jpg"', cards[1]) == ["frame_005", "frame_006"]
  assert "Purple &amp; orange &gt; blue." in cards[1]                    # escaped
  assert 'class="nearest"' in cards[2] and "frame_007" in cards[2]       # nearest frame, marked as such
  assert "Parsed answer: <b>B</b>" in page and "NOT well-formed" in page
  assert "1 &lt;time&gt; tag(s) could not be parsed" in page
  assert '<li class="pred">B. red</li>' in page
  # The thumbnail shows the frame's colour (RGB kept through the BGR encoder).
  b, g, r = cv2.imread(str(tmp_path / "trace_files" / "frame_000.jpg"))[10, 10]
  assert abs(int(r) - 230) < 12 and abs(int(g) - 30) < 12 and abs(int(b) - 30) < 12


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="8 frames but 3 timestamps"):
    render_trace_html("q", [], TRACE, _frames(), [0, 1, 2], str(tmp_path / "a.html"))
  with pytest.raises(ValueError, match=r"\[T, H, W, 3\] uint8"):
    render_trace_html("q", [], TRACE, _frames().astype(np.float32), TIMESTAMPS, str(tmp_path / "a.html"))


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _colour_pixels(img_bgr, rgb, tol=30):
  target = np.array(rgb[::-1], np.int32)
  return int((np.abs(img_bgr.astype(np.int32) - target).max(axis=-1) <= tol).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian package `chromium`); "
                                             "the headless rendering check needs it")
def test_chromium_screenshot_shows_thumbnails(tmp_path):
  out = render_trace_html("Which colour comes first?", ["A. green", "B. red"], TRACE, _frames(), TIMESTAMPS,
                          str(tmp_path / "trace.html"))
  shot = tmp_path / "shot.png"
  proc = subprocess.run(
      [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2600",
       f"--screenshot={shot}", f"file://{out}"],
      capture_output=True, text=True, timeout=120)
  assert shot.exists(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
  img = cv2.imread(str(shot))
  # Every frame's colour covers at least most of one 192x144 thumbnail (the timeline shows all 8).
  for rgb in COLOURS:
    assert _colour_pixels(img, rgb) > 0.7 * 192 * 144, rgb
  # Control: a colour that is on no frame is absent, so the check above can fail.
  assert _colour_pixels(img, (255, 0, 255), tol=20) < 50
