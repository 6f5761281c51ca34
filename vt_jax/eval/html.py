"""A trace viewer: one HTML page showing what the model looked at for each `<time>` window.

    render_trace_html(question, options, trace_text, frames_uint8, timestamps, "out/trace.html")

writes `out/trace.html` and the JPEG thumbnails it shows into `out/trace_files/` (referenced relatively,
so the page and its folder can be moved or zipped together). The page holds the question and options,
the parsed answer, one card per `<time>` window with the sampled frames whose timestamps fall inside it
next to the window's caption and reasoning, every sampled frame on a timeline, and the full trace.
"""

from __future__ import annotations

import html
import os
import re
from typing import Sequence

import cv2
import numpy as np

from vt_jax import trace

THUMB_WIDTH = 192

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; max-width: 1100px; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
.question { white-space: pre-wrap; font-size: 1.05em; }
.options { list-style: none; padding-left: 1em; } .options li.pred { font-weight: bold; }
.answer { font-size: 1.1em; padding: 6px 10px; background: #eef6ee; display: inline-block; }
.clue { border: 1px solid #ccc; border-radius: 6px; padding: 10px; margin: 12px 0; }
.span { font-family: monospace; font-weight: bold; color: #1a5fb4; }
.thumbs { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
figure { margin: 0; text-align: center; font-size: 0.8em; color: #555; }
figure img { display: block; border: 3px solid transparent; }
figure.inside img { border-color: #2ec27e; }
figure.nearest img { border-color: #e5a50a; }
.caption { background: #f6f8fa; padding: 6px; }
.think { color: #555; font-style: italic; }
pre.trace { white-space: pre-wrap; background: #fafafa; border: 1px solid #ddd; padding: 10px; }
.tag { color: #a51d2d; }
"""


def frames_in_window(timestamps: np.ndarray, start: float, end: float) -> np.ndarray:
  """Indices of the frames whose timestamp t satisfies start <= t <= end. timestamps: [T] seconds."""
  ts = np.asarray(timestamps, np.float64)
  return np.nonzero((ts >= start) & (ts <= end))[0]


def _write_thumbnails(frames_uint8: np.ndarray, folder: str, width: int) -> list[str]:
  """JPEG thumbnails of [T, H, W, 3] RGB frames -> file names inside `folder`."""
  os.makedirs(folder, exist_ok=True)
  names = []
  for i, frame in enumerate(frames_uint8):
    h, w = frame.shape[:2]
    size = (width, max(1, round(h * width / w)))
    thumb = cv2.resize(np.ascontiguousarray(frame), size, interpolation=cv2.INTER_AREA)
    name = f"frame_{i:03d}.jpg"
    if not cv2.imwrite(os.path.join(folder, name), cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)):
      raise OSError(f"could not write thumbnail {os.path.join(folder, name)}")
    names.append(name)
  return names


def _highlight_tags(text: str) -> str:
  """HTML-escaped trace with the trace tags coloured."""
  escaped = html.escape(text)
  return re.sub(r"&lt;/?(time|caption|think|answer)&gt;", lambda m: f'<span class="tag">{m.group(0)}</span>',
                escaped)


def _figure(folder_name: str, thumbs: list[str], i: int, t: float, css: str) -> str:
  src = html.escape(f"{folder_name}/{thumbs[i]}")
  return (f'<figure class="{css}"><img src="{src}" alt="frame {i} at {t:.1f}s">'
          f"frame {i} · {trace.format_timestamp(t)} ({t:.1f}s)</figure>")


def render_trace_html(question: str, options: Sequence[str], trace_text: str, frames_uint8: np.ndarray,
                      timestamps: Sequence[float] | np.ndarray, out_path: str, *,
                      title: str = "Video-Thinker trace", thumb_width: int = THUMB_WIDTH) -> str:
  """Writes the trace page and its thumbnails; returns out_path.

  options: ["A. text", ...] (may be empty). frames_uint8: [T, H, W, 3] RGB uint8, the frames the model
  saw. timestamps: [T] seconds of each frame in the video. Windows are the parsable `<time>` spans of
  the trace; a window that no sampled frame falls in shows the nearest frame instead, marked as such.
  """
  frames = np.asarray(frames_uint8)
  ts = np.asarray(timestamps, np.float64).reshape(-1)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"frames_uint8 must be [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
  if len(ts) != len(frames):
    raise ValueError(f"{len(frames)} frames but {len(ts)} timestamps (one per frame expected)")

  out_dir = os.path.dirname(os.path.abspath(out_path))
  folder_name = os.path.splitext(os.path.basename(out_path))[0] + "_files"
  thumbs = _write_thumbnails(frames, os.path.join(out_dir, folder_name), thumb_width)

  letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(options)] or None
  pred = trace.extract_answer(trace_text, letters)
  well_formed = trace.is_well_formed(trace_text)
  windows = trace.time_windows(trace_text)
  unparsed = trace_text.count("<time>") - len(windows)
  clues = list(trace.parse_clues(trace_text))

  body = [f"<h1>{html.escape(title)}</h1>", "<h2>Question</h2>",
          f'<div class="question">{html.escape(question)}</div>']
  if options:
    body.append('<ul class="options">')
    for letter, opt in zip(letters or "", options):
      css = ' class="pred"' if letter == pred else ""
      body.append(f"<li{css}>{html.escape(opt)}</li>")
    body.append("</ul>")
  body.append(f'<p class="answer">Parsed answer: <b>{html.escape(pred or "none")}</b> · format '
              f'{"well-formed" if well_formed else "NOT well-formed"}</p>')

  body.append(f"<h2>Time windows ({len(windows)})</h2>")
  if unparsed:
    body.append(f"<p>{unparsed} &lt;time&gt; tag(s) could not be parsed as MM:SS-MM:SS and are not shown.</p>")
  inside_any = np.zeros(len(ts), bool)
  for k, (start, end) in enumerate(windows):
    # The clue (caption + think) written for this window, if it was part of a well-formed triplet.
    clue = next((c for c in clues if (c.start, c.end) == (start, end)), None)
    if clue is not None:
      clues.remove(clue)
    idx = frames_in_window(ts, start, end)
    inside_any[idx] = True
    if len(idx):
      figs = [_figure(folder_name, thumbs, int(i), ts[i], "inside") for i in idx]
    elif len(ts):
      nearest = int(np.argmin(np.minimum(np.abs(ts - start), np.abs(ts - end))))
      figs = [_figure(folder_name, thumbs, nearest, ts[nearest], "nearest"),
              "<p>No sampled frame falls in this window; the nearest one is shown.</p>"]
    else:
      figs = ["<p>No frames.</p>"]
    body.append(f'<div class="clue"><div class="span">#{k + 1} &lt;time&gt;{trace.format_span(start, end)}'
                f"&lt;/time&gt; ({start:.1f}s-{end:.1f}s, {len(idx)} frame(s))</div>")
    body.append('<div class="thumbs">' + "".join(figs) + "</div>")
    if clue is not None:
      body.append(f'<div class="caption">{html.escape(clue.caption)}</div>')
      body.append(f'<div class="think">{html.escape(clue.think)}</div>')
    else:
      body.append('<div class="caption">(no caption: not part of a well-formed triplet)</div>')
    body.append("</div>")

  body.append(f"<h2>All sampled frames ({len(ts)})</h2>")
  body.append('<div class="thumbs">' + "".join(
      _figure(folder_name, thumbs, i, ts[i], "inside" if inside_any[i] else "") for i in range(len(ts)))
      + "</div>")
  body.append("<h2>Full trace</h2>")
  body.append(f'<pre class="trace">{_highlight_tags(trace_text)}</pre>')

  page = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
          f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
          + "\n".join(body) + "\n</body></html>\n")
  with open(out_path, "w", encoding="utf-8") as f:
    f.write(page)
  return out_path
