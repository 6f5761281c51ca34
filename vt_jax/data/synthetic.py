"""A small, seeded video-reasoning dataset in the exact Video-Thinker-10K record format.

Each sample is a real mp4v video (112x112, 4 fps, 12-24 s) in which 2-3 bold shapes (circle,
square, triangle, diamond; red, green, blue, yellow) appear one after another on a dark
background, each moving in one direction (left/right/up/down) and sometimes changing colour. One
4-option question per video can only be answered from the right moment(s):

  colour_change  "What colour did the square turn into?"       (the square's lifetime, 2 segments)
  next_after     "Which object appeared right after the red circle left?"  (2 segments)
  direction      "In which direction did the triangle move?"   (1 segment)
  first_appear   "Which shape appeared first?"                  (1 segment)

Every event time is a whole second, so the reference trace's `<time>MM:SS-MM:SS</time>` windows
are exactly the ground-truth `segments`. Records carry the Video-Thinker-10K fields (`problem`,
`options`, `solution`, `process`, `path`, `data_source`, `problem_type`, `data_type`,
`problem_id`) plus `segments` ([[start_s, end_s], ...]), `question_type`, `duration`, `fps` and
`events` (the script the video was drawn from, so answers can be re-derived).

The visual vocabulary is deliberately tiny so a tiny model can learn it: with
`SYNTH_SAMPLING` (16 frames, 112x112 -> grid 8x8x8 patches) a video is 8x4x4 = 128 merged tokens.

  python -m vt_jax.data.synthetic --out /tmp/synth --num-train 256 --num-test 64 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from typing import Any, Sequence

import cv2
import numpy as np

from vt_jax.data import synth_tokenizer
from vt_jax.data.video import VideoSampling

FORMAT_VERSION = 1
HEIGHT = WIDTH = 112
FPS = 4
MIN_DURATION, MAX_DURATION = 12, 24
MIN_LIFETIME = 4   # seconds an object stays; >= 4 leaves >= 2 s on each side of a colour change
MIN_GAP = 1        # empty seconds between two objects, so "left" and "appeared" are visible
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
QUESTION_TYPES = ("colour_change", "next_after", "direction", "first_appear")
LETTERS = "ABCD"
_RGB = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (40, 80, 240),
        "yellow": (240, 220, 30)}
BACKGROUND_RGB = (40, 40, 40)
OBJECT_RADIUS = 18  # pixels; shapes are ~36 px across on a 112 px frame

# What the demo should sample: 16 frames at exactly 112x112 (min = max pixels, so no resize).
SYNTH_SAMPLING = VideoSampling(nframes=16, min_pixels=HEIGHT * WIDTH, max_pixels=HEIGHT * WIDTH)


class SyntheticDataError(RuntimeError):
  """The dataset directory is unusable (e.g. a manifest that does not match its files)."""


# --------------------------------------------------------------------------------------------
# Event script
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Event:
  """One object's life: visible on [start, end) seconds, moving `direction`; colour becomes
  `new_colour` at `change_at` (both None when it keeps its colour)."""
  shape: str
  colour: str
  start: int
  end: int
  direction: str
  new_colour: str | None = None
  change_at: int | None = None

  def colour_at(self, t: float) -> str:
    if self.change_at is not None and t >= self.change_at:
      return self.new_colour
    return self.colour

  @property
  def final_colour(self) -> str:
    return self.new_colour or self.colour


def _make_script(rng: np.random.Generator, qtype: str) -> tuple[int, list[Event]]:
  """Duration and non-overlapping events, all times whole seconds."""
  duration = int(rng.integers(MIN_DURATION, MAX_DURATION + 1))
  max_k = 3 if duration >= 3 * MIN_LIFETIME + 2 * MIN_GAP else 2
  k = int(rng.integers(2, max_k + 1))
  slack = duration - (k * MIN_LIFETIME + (k - 1) * MIN_GAP)
  # Spread the slack over k lifetimes and k + 1 gaps (lead, between, tail).
  extra = rng.multinomial(slack, np.full(2 * k + 1, 1.0 / (2 * k + 1)))
  shapes = rng.permutation(len(SHAPES))[:k]
  must_change = int(rng.integers(k)) if qtype == "colour_change" else -1
  events, t = [], int(extra[0])
  for i in range(k):
    life = MIN_LIFETIME + int(extra[1 + i])
    start, end = t, t + life
    colour = COLOURS[int(rng.integers(len(COLOURS)))]
    new_colour = change_at = None
    if i == must_change or (must_change < 0 and rng.random() < 0.3):
      new_colour = COLOURS[int(rng.choice([j for j, c in enumerate(COLOURS) if c != colour]))]
      change_at = int(rng.integers(start + 2, end - 1))  # >= 2 s of each colour
    events.append(Event(SHAPES[shapes[i]], colour, start, end,
                        DIRECTIONS[int(rng.integers(len(DIRECTIONS)))], new_colour, change_at))
    t = end + MIN_GAP + int(extra[1 + k + i])
  assert events[-1].end <= duration, (events, duration)
  return duration, events


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _centre(event: Event, t: float) -> tuple[int, int]:
  """(x, y) pixel centre: the object crosses the frame along its direction over its lifetime."""
  p = (t - event.start) / (event.end - event.start)
  lo, hi = OBJECT_RADIUS + 8, WIDTH - OBJECT_RADIUS - 8
  travel = lo + p * (hi - lo)
  mid = WIDTH // 2
  return {"right": (travel, mid), "left": (lo + hi - travel, mid),
          "down": (mid, travel), "up": (mid, lo + hi - travel)}[event.direction]


def render_frame(events: Sequence[Event], t: float) -> np.ndarray:
  """RGB uint8 `[HEIGHT, WIDTH, 3]` at time t seconds."""
  img = np.empty((HEIGHT, WIDTH, 3), np.uint8)
  img[:] = BACKGROUND_RGB
  r = OBJECT_RADIUS
  for e in events:
    if not e.start <= t < e.end:
      continue
    x, y = (int(round(v)) for v in _centre(e, t))
    colour = _RGB[e.colour_at(t)]
    if e.shape == "circle":
      cv2.circle(img, (x, y), r, colour, -1, cv2.LINE_AA)
    elif e.shape == "square":
      cv2.rectangle(img, (x - r + 2, y - r + 2), (x + r - 2, y + r - 2), colour, -1)
    elif e.shape == "triangle":
      pts = np.array([[x, y - r], [x - r, y + r - 2], [x + r, y + r - 2]], np.int32)
      cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    else:  # diamond
      pts = np.array([[x, y - r], [x + r, y], [x, y + r], [x - r, y]], np.int32)
      cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
  return img


def render_video(events: Sequence[Event], duration: int, fps: int = FPS) -> np.ndarray:
  """All frames, RGB uint8 `[duration * fps, HEIGHT, WIDTH, 3]`; frame i shows time i / fps."""
  return np.stack([render_frame(events, i / fps) for i in range(duration * fps)])


def write_video(path: str, frames: np.ndarray, fps: int = FPS) -> None:
  """Write RGB frames as an mp4v .mp4 (OpenCV's built-in encoder: no extra codec needed)."""
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (WIDTH, HEIGHT))
  if not writer.isOpened():
    raise SyntheticDataError(f"{path}: OpenCV cannot open an mp4v writer")
  for frame in frames:
    writer.write(np.ascontiguousarray(frame[..., ::-1]))
  writer.release()


# --------------------------------------------------------------------------------------------
# Questions and traces
# --------------------------------------------------------------------------------------------
def mmss(seconds: int) -> str:
  """Whole seconds -> zero-padded "MM:SS"."""
  return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _motion(e: Event) -> str:
  return {"left": "moves to the left", "right": "moves to the right", "up": "moves upwards",
          "down": "moves downwards"}[e.direction]


def _caption(e: Event, lo: int, hi: int) -> str:
  """What is visible during [lo, hi] of event e."""
  c0, c1 = e.colour_at(lo), e.colour_at(hi - 0.5)
  text = f"A {c0} {e.shape} appears and {_motion(e)}" if lo == e.start else \
      f"The {e.shape}, now {c0}, keeps going {e.direction if e.direction in ('up', 'down') else 'to the ' + e.direction}"
  if c1 != c0:
    text += f"; it turns {c1} at {mmss(e.change_at)}"
  if hi == e.end:
    text += ", then it leaves the frame"
  return text + "."


def _triplet(e: Event, lo: int, hi: int, think: str) -> str:
  return (f"<time>{mmss(lo)}-{mmss(hi)}</time> <caption>{_caption(e, lo, hi)}</caption> "
          f"<think>{think}</think>")


def _phrase(colour: str, shape: str) -> str:
  return f"{colour} {shape}"


def _question(rng: np.random.Generator, qtype: str, events: list[Event]):
  """(problem, correct option text, distractors, segments, triplets, free text, walk notes)."""
  if qtype == "colour_change":
    changing = [e for e in events if e.change_at is not None]
    e = changing[int(rng.integers(len(changing)))]
    problem = f"What colour did the {e.shape} turn into?"
    correct = e.new_colour
    distractors = [c for c in COLOURS if c != correct]
    segments = [[e.start, e.change_at], [e.change_at, e.end]]
    triplets = [
        _triplet(e, e.start, e.change_at, f"This is the {e.shape} before any change: it is {e.colour}."),
        _triplet(e, e.change_at, e.end,
                 f"From {mmss(e.change_at)} the {e.shape} is {e.new_colour}, so it turned from "
                 f"{e.colour} into {e.new_colour}."),
    ]
    between = "Let me check whether its colour stays the same."
    notes = {c: ("its colour before the change" if c == e.colour else "never the " + e.shape + "'s colour")
             for c in distractors}
  elif qtype == "next_after":
    i = int(rng.integers(len(events) - 1))
    a, b = events[i], events[i + 1]
    problem = f"Which object appeared right after the {_phrase(a.final_colour, a.shape)} left?"
    correct = _phrase(b.colour, b.shape)
    pool = {_phrase(e.colour, e.shape) for e in events} | {_phrase(a.final_colour, a.shape)}
    pool.discard(correct)
    distractors = sorted(pool)
    while len(distractors) < 3:  # pad with unseen combinations
      cand = _phrase(COLOURS[int(rng.integers(4))], SHAPES[int(rng.integers(4))])
      if cand != correct and cand not in distractors:
        distractors.append(cand)
    distractors = [distractors[j] for j in rng.permutation(len(distractors))[:3]]
    segments = [[a.start, a.end], [b.start, b.end]]
    triplets = [
        _triplet(a, a.start, a.end, f"The {a.shape} is on screen until {mmss(a.end)}."),
        _triplet(b, b.start, b.end,
                 f"The next object to appear, at {mmss(b.start)}, is a {b.colour} {b.shape}."),
    ]
    between = "Hmm, what comes next after it leaves?"
    seen = {_phrase(e.colour, e.shape): e for e in events}
    notes = {d: ("the object that left" if d == _phrase(a.final_colour, a.shape) else
                 "appears at a different time" if d in seen else "never appears") for d in distractors}
  elif qtype == "direction":
    e = events[int(rng.integers(len(events)))]
    problem = f"In which direction did the {e.shape} move?"
    correct = e.direction
    distractors = [d for d in DIRECTIONS if d != correct]
    segments = [[e.start, e.end]]
    triplets = [_triplet(e, e.start, e.end,
                         f"Over its whole time on screen the {e.shape} travels {e.direction}.")]
    between = ""
    notes = {d: "not the way it moves" for d in distractors}
  elif qtype == "first_appear":
    e = events[0]
    problem = "Which shape appeared first?"
    correct = e.shape
    distractors = [s for s in SHAPES if s != correct]
    segments = [[e.start, e.end]]
    triplets = [_triplet(e, e.start, e.end,
                         f"Nothing is on screen before {mmss(e.start)}, so the {e.shape} is first.")]
    between = ""
    names = {x.shape for x in events}
    notes = {d: ("appears later" if d in names else "never appears") for d in distractors}
  else:
    raise ValueError(f"unknown question type {qtype!r}")
  return problem, correct, distractors, segments, triplets, between, notes


def make_sample(rng: np.random.Generator, qtype: str, letter: str) -> dict[str, Any]:
  """One sample (without path / problem_id): script, question with the answer at `letter`."""
  duration, events = _make_script(rng, qtype)
  problem, correct, distractors, segments, triplets, between, notes = _question(rng, qtype, events)
  slot = LETTERS.index(letter)
  order = [distractors[j] for j in rng.permutation(3)]
  order.insert(slot, correct)
  options = [f"{LETTERS[i]}. {text}" for i, text in enumerate(order)]
  walk = "; ".join(f"{LETTERS[i]}. {text} - " + ("matches what the video shows" if text == correct
                                                else notes[text])
                   for i, text in enumerate(order))
  sep = f" {between} " if between else " "
  process = sep.join(triplets) + f" Checking the options: {walk}. <answer>{letter}</answer>"
  return {
      "problem": problem, "options": options, "solution": f"<answer>{letter}</answer>",
      "process": process, "data_source": "synthetic", "problem_type": "multiple choice",
      "data_type": "video", "segments": segments, "question_type": qtype,
      "duration": duration, "fps": FPS,
      "events": [dataclasses.asdict(e) for e in events],
  }


def answer_from_events(record: dict[str, Any]) -> str:
  """Re-derive the correct option letter from a record's stored event script and question."""
  events = [Event(**e) for e in record["events"]]
  texts = [o.split(". ", 1)[1] for o in record["options"]]
  q, qtype = record["problem"], record["question_type"]
  if qtype == "colour_change":
    e = next(e for e in events if f" the {e.shape} " in f" {q} ")
    target = e.new_colour
  elif qtype == "next_after":
    i = next(i for i, e in enumerate(events) if f"the {_phrase(e.final_colour, e.shape)} left" in q)
    target = _phrase(events[i + 1].colour, events[i + 1].shape)
  elif qtype == "direction":
    target = next(e for e in events if f"the {e.shape} move" in q).direction
  else:
    target = min(events, key=lambda e: e.start).shape
  return LETTERS[texts.index(target)]


# --------------------------------------------------------------------------------------------
# Dataset on disk
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SyntheticPaths:
  """Where a generated dataset lives; record `path`s are relative to `root`."""
  root: str
  train_json: str
  test_json: str
  video_dir: str
  tokenizer_dir: str
  manifest: str


def _paths(out_dir: str) -> SyntheticPaths:
  return SyntheticPaths(root=out_dir, train_json=os.path.join(out_dir, "train.json"),
                        test_json=os.path.join(out_dir, "test.json"),
                        video_dir=os.path.join(out_dir, "videos"),
                        tokenizer_dir=os.path.join(out_dir, "tokenizer"),
                        manifest=os.path.join(out_dir, "manifest.json"))


def _split(rng_seed: tuple[int, int], split: str, n: int, first_id: int,
           video_dir: str) -> list[dict[str, Any]]:
  rng = np.random.default_rng(list(rng_seed))
  # Exactly balanced answer letters and question types, in a random order.
  letters = rng.permutation(np.arange(n) % 4)
  qtypes = rng.permutation(np.arange(n) % len(QUESTION_TYPES))
  records = []
  for i in range(n):
    sample = make_sample(rng, QUESTION_TYPES[qtypes[i]], LETTERS[letters[i]])
    rel = f"videos/{split}_{i:05d}.mp4"
    events = [Event(**e) for e in sample["events"]]
    write_video(os.path.join(video_dir, os.path.basename(rel)),
                render_video(events, sample["duration"]))
    records.append({"problem_id": first_id + i, **sample, "path": rel})
  return records


def _dump(records: list[dict[str, Any]], path: str) -> str:
  text = json.dumps(records, indent=1, ensure_ascii=False) + "\n"
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return hashlib.sha256(text.encode()).hexdigest()


def _settings(num_train: int, num_test: int, seed: int, vocab_size: int) -> dict[str, Any]:
  return {"format_version": FORMAT_VERSION, "num_train": num_train, "num_test": num_test,
          "seed": seed, "vocab_size": vocab_size, "height": HEIGHT, "width": WIDTH, "fps": FPS}


def generate_dataset(out_dir: str | os.PathLike, num_train: int = 256, num_test: int = 64,
                     seed: int = 0, *, vocab_size: int = 1024,
                     extra_texts: Sequence[str] = ()) -> SyntheticPaths:
  """Write videos/, train.json, test.json, tokenizer/ and (last) manifest.json under out_dir.

  Deterministic for (num_train, num_test, seed): byte-identical JSON and identical frames. The
  test split uses its own random stream, so it is held out (no shared videos or scripts).
  `extra_texts` (e.g. the real prompt) are added to the tokenizer's training text.
  """
  if num_train < 1 or num_test < 0:
    raise ValueError(f"need num_train >= 1 and num_test >= 0, got {num_train}, {num_test}")
  out_dir = os.fspath(out_dir)
  paths = _paths(out_dir)
  if os.path.exists(paths.manifest):
    os.remove(paths.manifest)  # invalid until everything below is rewritten
  shutil.rmtree(paths.video_dir, ignore_errors=True)
  os.makedirs(paths.video_dir, exist_ok=True)
  train = _split((seed, 0), "train", num_train, 0, paths.video_dir)
  test = _split((seed, 1), "test", num_test, num_train, paths.video_dir)
  digests = {"train.json": _dump(train, paths.train_json),
             "test.json": _dump(test, paths.test_json)}
  texts = list(extra_texts) + [t for r in train + test
                               for t in (r["problem"], *r["options"], r["process"])]
  synth_tokenizer.build_tokenizer(texts, paths.tokenizer_dir, vocab_size=vocab_size)
  manifest = {**_settings(num_train, num_test, seed, vocab_size), "files": digests,
              "videos": len(train) + len(test)}
  tmp = paths.manifest + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, paths.manifest)
  return paths


def ensure_dataset(out_dir: str | os.PathLike, num_train: int = 256, num_test: int = 64,
                   seed: int = 0, *, vocab_size: int = 1024,
                   extra_texts: Sequence[str] = ()) -> SyntheticPaths:
  """Return the dataset under out_dir, generating it only if the manifest is missing, was written
  for other settings, or its files are gone (a cheap check: no video is decoded)."""
  out_dir = os.fspath(out_dir)
  paths = _paths(out_dir)
  try:
    with open(paths.manifest) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    manifest = None
  if manifest is not None and all(manifest.get(k) == v for k, v in
                                  _settings(num_train, num_test, seed, vocab_size).items()):
    complete = (os.path.isfile(paths.train_json) and os.path.isfile(paths.test_json) and
                os.path.isfile(os.path.join(paths.tokenizer_dir, "tokenizer.json")) and
                os.path.isdir(paths.video_dir) and
                len(os.listdir(paths.video_dir)) == manifest.get("videos"))
    if complete:
      return paths
  return generate_dataset(out_dir, num_train, num_test, seed, vocab_size=vocab_size,
                          extra_texts=extra_texts)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num-train", type=int, default=256)
  parser.add_argument("--num-test", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab-size", type=int, default=1024)
  parser.add_argument("--force", action="store_true", help="regenerate even if complete")
  args = parser.parse_args(argv)
  fn = generate_dataset if args.force else ensure_dataset
  paths = fn(args.out, args.num_train, args.num_test, args.seed, vocab_size=args.vocab_size)
  print(json.dumps(dataclasses.asdict(paths), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
