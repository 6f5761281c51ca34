"""A small, seeded video-reasoning dataset in the exact Video-Thinker-10K record format.

Each sample is a real mp4v video (112x112, 4 fps, 12-24 s) in which bold shapes (circle, square,
triangle, diamond) of distinct colours (red, green, blue, yellow) appear one after another on a dark
background, each moving in one direction (left/right/up/down). One 4-option question per video is
answered from the right moment(s). The generator knows six question types (`NUM_OBJECTS`):

  only_colour    "What colour is the object?"                  (1 object, its lifetime)
  colour_change  "One object changes colour. What colour does it turn into?"  (1 object; before/after)
  first_colour   "What colour was the first object to appear?"         (2 objects)
  last_colour    "What colour was the last object to appear?"          (2 objects)
  missing_colour "Which colour never appears in the video?"            (3 objects, 3 segments)
  direction      "In which direction did the red object move?"         (2-3 objects)

`QUESTION_TYPES` is the default mix; `generate_dataset(question_types=...)` picks another (a type listed
twice is asked twice as often). The CPU demo uses half only_colour, half first/last_colour: its tiny model
learns to read a colour off the frames only after a plateau of a few hundred steps (SFT demo with only
one-object questions, 800 steps: 100% held-out accuracy; with half one-object, half colour_change
questions and 500 steps it was still at chance, 25%), and locating the right one of two objects in time
is beyond it at that budget (44% after 1,000 steps). The demo's GRPO phase asks one-object questions
about the videos of an extra prompt-only split (`num_rl`, `rl_question_types`).
Options come in one fixed order per type (A-D = red, green, blue, yellow or left, right, up, down), so
the letter follows from what was seen; answer letters and question types are exactly balanced. The
reference trace is 1-3 `<time>`/`<caption>`/`<think>` triplets, then "The answer is X, option L." and
`<answer>L</answer>`. (Format 1 shuffled the options and asked about shapes and object order; the demo
model learned its trace format but not its answers: 26-34% accuracy after SFT.)

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

FORMAT_VERSION = 2
HEIGHT = WIDTH = 112
FPS = 4
MIN_DURATION, MAX_DURATION = 12, 24
MIN_LIFETIME = 4   # seconds an object stays; >= 4 leaves >= 2 s on each side of a colour change
MIN_GAP = 1        # empty seconds between two objects, so "left" and "appeared" are visible
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow")
DIRECTIONS = ("left", "right", "up", "down")
# Objects per video (fewest, most) for each question type the generator knows.
NUM_OBJECTS = {"only_colour": (1, 1), "colour_change": (1, 1), "first_colour": (2, 2),
               "last_colour": (2, 2), "missing_colour": (3, 3), "direction": (2, 3)}
QUESTION_TYPES = ("only_colour", "colour_change", "first_colour", "last_colour")  # default mix
# Options are listed in one fixed order per question type (as many benchmarks list attributes), so
# the answer letter follows from the attribute: a tiny model need not learn to search the option list.
OPTIONS = {"only_colour": COLOURS, "colour_change": COLOURS, "first_colour": COLOURS,
           "last_colour": COLOURS, "missing_colour": COLOURS, "direction": DIRECTIONS}
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


def _make_script(rng: np.random.Generator, qtype: str, target: str) -> tuple[int, list[Event], int]:
  """(duration, events, index of the object asked about): non-overlapping events, all times whole
  seconds, built so that the answer to a `qtype` question is `target`. Objects in one video have
  distinct colours (a colour names one object); only colour_change videos change a colour."""
  lo, hi = NUM_OBJECTS[qtype]
  shortest = lambda n: n * MIN_LIFETIME + (n - 1) * MIN_GAP  # pylint: disable=unnecessary-lambda-assignment
  duration = int(rng.integers(max(MIN_DURATION, shortest(lo)), MAX_DURATION + 1))
  k = int(rng.integers(lo, max(n for n in range(lo, hi + 1) if shortest(n) <= duration) + 1))
  slack = duration - shortest(k)
  # Spread the slack over k lifetimes and k + 1 gaps (lead, between, tail).
  extra = rng.multinomial(slack, np.full(2 * k + 1, 1.0 / (2 * k + 1)))
  shapes = rng.permutation(len(SHAPES))[:k]
  others = [c for c in COLOURS if c != target]
  colours = [others[j] for j in rng.permutation(len(others))[:k]]
  directions = [DIRECTIONS[int(rng.integers(len(DIRECTIONS)))] for _ in range(k)]
  asked = {"first_colour": 0, "last_colour": k - 1}.get(qtype, int(rng.integers(k)))
  if qtype in ("only_colour", "first_colour", "last_colour"):
    colours[asked] = target
  elif qtype == "direction":
    directions[asked] = target
  # missing_colour: target is absent by construction; colour_change: the asked object turns into it.
  events, t = [], int(extra[0])
  for i in range(k):
    life = MIN_LIFETIME + int(extra[1 + i])
    start, end = t, t + life
    new_colour = change_at = None
    if qtype == "colour_change" and i == asked:
      new_colour = target
      change_at = int(rng.integers(start + 2, end - 1))  # >= 2 s of each colour
    events.append(Event(SHAPES[shapes[i]], colours[i], start, end, directions[i], new_colour, change_at))
    t = end + MIN_GAP + int(extra[1 + k + i])
  assert events[-1].end <= duration, (events, duration)
  return duration, events, asked


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


def _question(qtype: str, events: list[Event], asked: int):
  """(problem, answer text, segments, reasoning triplets, free text between them) for `events[asked]`."""
  e = events[asked]
  if qtype == "colour_change":
    triplets = [
        _triplet(e, e.start, e.change_at, f"This is the {e.shape} before the change: it is {e.colour}."),
        _triplet(e, e.change_at, e.end,
                 f"From {mmss(e.change_at)} the {e.shape} is {e.new_colour}, so it turned from "
                 f"{e.colour} into {e.new_colour}."),
    ]
    return ("One object changes colour. What colour does it turn into?", e.new_colour,
            [[e.start, e.change_at], [e.change_at, e.end]], triplets,
            "Let me check whether its colour stays the same.")
  if qtype == "missing_colour":
    correct = next(c for c in COLOURS if all(c != x.colour for x in events))
    return ("Which colour never appears in the video?", correct, [[x.start, x.end] for x in events],
            [_triplet(x, x.start, x.end, f"The {x.shape} is {x.colour}.") for x in events], "")
  # The rest ask about one object over its whole lifetime: (problem, answer, what the think says).
  lifetime = {
      "only_colour": ("What colour is the object?", e.colour, f"The {e.shape} is {e.colour}."),
      "first_colour": ("What colour was the first object to appear?", e.colour,
                       f"This is the first object to appear: the {e.shape} is {e.colour}."),
      "last_colour": ("What colour was the last object to appear?", e.colour,
                      f"Nothing appears after the {e.shape}, so it is the last object; it is {e.colour}."),
      "direction": (f"In which direction did the {e.colour} object move?", e.direction,
                    f"Over its whole time on screen the {e.colour} {e.shape} travels {e.direction}."),
  }
  if qtype not in lifetime:
    raise ValueError(f"unknown question type {qtype!r}")
  problem, correct, think = lifetime[qtype]
  return problem, correct, [[e.start, e.end]], [_triplet(e, e.start, e.end, think)], ""


def make_sample(rng: np.random.Generator, qtype: str, letter: str) -> dict[str, Any]:
  """One sample (without path / problem_id): a script whose answer is option `letter`."""
  options = OPTIONS[qtype]
  target = options[LETTERS.index(letter)]
  duration, events, asked = _make_script(rng, qtype, target)
  problem, correct, segments, triplets, between = _question(qtype, events, asked)
  assert correct == target, (qtype, correct, target)
  sep = f" {between} " if between else " "
  process = sep.join(triplets) + f" The answer is {correct}, option {letter}. <answer>{letter}</answer>"
  return {
      "problem": problem, "options": [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)],
      "solution": f"<answer>{letter}</answer>",
      "process": process, "data_source": "synthetic", "problem_type": "multiple choice",
      "data_type": "video", "segments": segments, "question_type": qtype,
      "duration": duration, "fps": FPS,
      "events": [dataclasses.asdict(e) for e in events],
  }


def answer_from_events(record: dict[str, Any]) -> str:
  """Re-derive the correct option letter from a record's stored event script and question."""
  events = sorted((Event(**e) for e in record["events"]), key=lambda e: e.start)
  texts = [o.split(". ", 1)[1] for o in record["options"]]
  q, qtype = record["problem"], record["question_type"]
  if qtype == "only_colour":
    (target,) = [e.colour for e in events]
  elif qtype == "first_colour":
    target = events[0].colour
  elif qtype == "last_colour":
    target = events[-1].colour
  elif qtype == "colour_change":
    (target,) = [e.new_colour for e in events if e.change_at is not None]
  elif qtype == "missing_colour":
    (target,) = [c for c in COLOURS if all(c != e.colour for e in events)]
  else:
    target = next(e for e in events if f"the {e.colour} object" in q).direction
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
  rl_json: str       # prompts for GRPO, from videos SFT never saw (written when num_rl > 0)
  video_dir: str
  tokenizer_dir: str
  manifest: str


def _paths(out_dir: str) -> SyntheticPaths:
  return SyntheticPaths(root=out_dir, train_json=os.path.join(out_dir, "train.json"),
                        test_json=os.path.join(out_dir, "test.json"),
                        rl_json=os.path.join(out_dir, "rl.json"),
                        video_dir=os.path.join(out_dir, "videos"),
                        tokenizer_dir=os.path.join(out_dir, "tokenizer"),
                        manifest=os.path.join(out_dir, "manifest.json"))


def _split(rng_seed: tuple[int, int], split: str, n: int, first_id: int,
           video_dir: str, question_types: Sequence[str]) -> list[dict[str, Any]]:
  rng = np.random.default_rng(list(rng_seed))
  # Exactly balanced answer letters and question types, in a random order.
  letters = rng.permutation(np.arange(n) % 4)
  qtypes = rng.permutation(np.arange(n) % len(question_types))
  records = []
  for i in range(n):
    sample = make_sample(rng, question_types[qtypes[i]], LETTERS[letters[i]])
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


def _settings(num_train: int, num_test: int, seed: int, vocab_size: int,
              question_types: Sequence[str], num_rl: int = 0,
              rl_question_types: Sequence[str] = ()) -> dict[str, Any]:
  # The rl split is recorded only when used, so datasets written before it existed stay valid.
  rl = {"num_rl": num_rl, "rl_question_types": list(rl_question_types or question_types)} if num_rl else {}
  return {"format_version": FORMAT_VERSION, "num_train": num_train, "num_test": num_test,
          "seed": seed, "vocab_size": vocab_size, "height": HEIGHT, "width": WIDTH, "fps": FPS,
          "question_types": list(question_types), **rl}


def _check_types(question_types: Sequence[str]) -> tuple[str, ...]:
  unknown = [q for q in question_types if q not in NUM_OBJECTS]
  if unknown or not question_types:
    raise ValueError(f"question_types {list(question_types)}: unknown {unknown}; known: {sorted(NUM_OBJECTS)}")
  return tuple(question_types)


def generate_dataset(out_dir: str | os.PathLike, num_train: int = 256, num_test: int = 64,
                     seed: int = 0, *, vocab_size: int = 1024, extra_texts: Sequence[str] = (),
                     question_types: Sequence[str] = QUESTION_TYPES, num_rl: int = 0,
                     rl_question_types: Sequence[str] | None = None) -> SyntheticPaths:
  """Write videos/, train.json, test.json, [rl.json,] tokenizer/ and (last) manifest.json under out_dir.

  Deterministic for (num_train, num_test, seed): byte-identical JSON and identical frames. The
  test split uses its own random stream, so it is held out (no shared videos or scripts); so does the
  optional rl split (`num_rl` records of `rl_question_types`, default the same mix; same format: GRPO
  reads only question, options and answer), and adding it changes neither train, test nor the tokenizer.
  `extra_texts` (e.g. the real prompt) are added to the tokenizer's training text.
  """
  if num_train < 1 or num_test < 0 or num_rl < 0:
    raise ValueError(f"need num_train >= 1, num_test >= 0 and num_rl >= 0, got {num_train}, {num_test}, "
                     f"{num_rl}")
  out_dir = os.fspath(out_dir)
  paths = _paths(out_dir)
  if os.path.exists(paths.manifest):
    os.remove(paths.manifest)  # invalid until everything below is rewritten
  shutil.rmtree(paths.video_dir, ignore_errors=True)
  os.makedirs(paths.video_dir, exist_ok=True)
  question_types = _check_types(question_types)
  rl_types = _check_types(rl_question_types or question_types)
  train = _split((seed, 0), "train", num_train, 0, paths.video_dir, question_types)
  test = _split((seed, 1), "test", num_test, num_train, paths.video_dir, question_types)
  digests = {"train.json": _dump(train, paths.train_json),
             "test.json": _dump(test, paths.test_json)}
  rl = []
  if num_rl:
    rl = _split((seed, 2), "rl", num_rl, num_train + num_test, paths.video_dir, rl_types)
    digests["rl.json"] = _dump(rl, paths.rl_json)
  elif os.path.exists(paths.rl_json):
    os.remove(paths.rl_json)
  texts = list(extra_texts) + [t for r in train + test
                               for t in (r["problem"], *r["options"], r["process"])]
  synth_tokenizer.build_tokenizer(texts, paths.tokenizer_dir, vocab_size=vocab_size)
  manifest = {**_settings(num_train, num_test, seed, vocab_size, question_types, num_rl, rl_types),
              "files": digests,
              "videos": len(train) + len(test) + len(rl)}
  tmp = paths.manifest + ".tmp"
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  os.replace(tmp, paths.manifest)
  return paths


def ensure_dataset(out_dir: str | os.PathLike, num_train: int = 256, num_test: int = 64,
                   seed: int = 0, *, vocab_size: int = 1024, extra_texts: Sequence[str] = (),
                   question_types: Sequence[str] = QUESTION_TYPES, num_rl: int = 0,
                   rl_question_types: Sequence[str] | None = None) -> SyntheticPaths:
  """Return the dataset under out_dir, generating it only if the manifest is missing, was written
  for other settings, or its files are gone (a cheap check: no video is decoded)."""
  out_dir = os.fspath(out_dir)
  paths = _paths(out_dir)
  try:
    with open(paths.manifest) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    manifest = None
  want = _settings(num_train, num_test, seed, vocab_size, _check_types(question_types), num_rl,
                   _check_types(rl_question_types or question_types))
  if manifest is not None and {k: v for k, v in manifest.items() if k not in ("files", "videos")} == want:
    complete = (os.path.isfile(paths.train_json) and os.path.isfile(paths.test_json) and
                (not num_rl or os.path.isfile(paths.rl_json)) and
                os.path.isfile(os.path.join(paths.tokenizer_dir, "tokenizer.json")) and
                os.path.isdir(paths.video_dir) and
                len(os.listdir(paths.video_dir)) == manifest.get("videos"))
    if complete:
      return paths
  return generate_dataset(out_dir, num_train, num_test, seed, vocab_size=vocab_size,
                          extra_texts=extra_texts, question_types=question_types, num_rl=num_rl,
                          rl_question_types=rl_question_types)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--num-train", type=int, default=256)
  parser.add_argument("--num-test", type=int, default=64)
  parser.add_argument("--num-rl", type=int, default=0, help="prompt-only split for GRPO (rl.json)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--vocab-size", type=int, default=1024)
  parser.add_argument("--force", action="store_true", help="regenerate even if complete")
  args = parser.parse_args(argv)
  fn = generate_dataset if args.force else ensure_dataset
  paths = fn(args.out, args.num_train, args.num_test, args.seed, vocab_size=args.vocab_size, num_rl=args.num_rl)
  print(json.dumps(dataclasses.asdict(paths), indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
