"""The Video-Thinker trace format, parsed in one place.

A trace is a sequence of clue triplets

    <time>MM:SS-MM:SS</time> <caption>what is visible</caption> <think>analysis</think>

with free text allowed between them, then exactly one `<answer>X</answer>`. Rewards (format, accuracy,
grounding), evaluation (answer extraction, grounding metrics, format rate), the synthetic dataset and the
trace viewer all read traces through this module, so they agree on what a well-formed trace is.
"""

from __future__ import annotations

import dataclasses
import re

_TAGS = ("time", "caption", "think")
_TRIPLET_RE = re.compile(
    r"<time>(?P<time>[^<]*)</time>\s*<caption>(?P<caption>[^<]*)</caption>\s*<think>(?P<think>[^<]*)</think>",
    re.S,
)
_TIME_RE = re.compile(r"<time>([^<]*)</time>", re.S)
_GT_RE = re.compile(r"<answer>\s*([A-Z])\s*</answer>")
_STAMP_RE = re.compile(r"^\s*(?:(\d+):)?(\d+):(\d+(?:\.\d+)?)\s*$")
_SECONDS_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*s?\s*$")


@dataclasses.dataclass(frozen=True)
class Clue:
  """One grounded clue: a time window (seconds), its caption and the reasoning on it."""
  start: float
  end: float
  caption: str
  think: str


def parse_timestamp(text: str) -> float | None:
  """`MM:SS`, `HH:MM:SS` (fractional seconds allowed) or plain seconds -> seconds; None if unparsable."""
  m = _STAMP_RE.match(text)
  if m:
    hours, minutes, seconds = m.groups()
    return int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
  m = _SECONDS_RE.match(text)
  return float(m.group(1)) if m else None


def parse_span(text: str) -> tuple[float, float] | None:
  """`MM:SS-MM:SS` (or any two `parse_timestamp` forms joined by '-') -> (start, end) with start <= end."""
  parts = text.split("-")
  if len(parts) != 2:
    return None
  start, end = parse_timestamp(parts[0]), parse_timestamp(parts[1])
  if start is None or end is None or end < start:
    return None
  return start, end


def format_timestamp(seconds: float) -> str:
  """Seconds -> zero-padded `MM:SS` (minutes may exceed 59 for long videos, as in the paper's traces)."""
  total = int(seconds)
  return f"{total // 60:02d}:{total % 60:02d}"


def format_span(start: float, end: float) -> str:
  return f"{format_timestamp(start)}-{format_timestamp(end)}"


def time_windows(text: str) -> list[tuple[float, float]]:
  """All parsable `<time>` windows in order of appearance, in seconds."""
  spans = (parse_span(t) for t in _TIME_RE.findall(text))
  return [s for s in spans if s is not None]


def parse_clues(text: str) -> list[Clue]:
  """The well-formed triplets in order; malformed ones (bad span, missing tag) are left out."""
  clues = []
  for m in _TRIPLET_RE.finditer(text):
    span = parse_span(m.group("time"))
    if span is not None:
      clues.append(Clue(span[0], span[1], m.group("caption").strip(), m.group("think").strip()))
  return clues


def _answer_bodies(text: str) -> list[str]:
  """Bodies of `<answer>...</answer>` pairs (each open tag closes at the next close tag), in linear time:
  a regex findall rescans to the end from every unclosed tag, quadratic on garbage rollouts."""
  bodies, pos = [], 0
  while True:
    start = text.find("<answer>", pos)
    if start < 0:
      return bodies
    end = text.find("</answer>", start + 8)
    if end < 0:
      return bodies
    bodies.append(text[start + 8:end])
    pos = end + 9


def answer_tags(text: str) -> list[str]:
  """Contents of every `<answer>...</answer>`, stripped."""
  return [a.strip() for a in _answer_bodies(text)]


def ground_truth_letter(solution: str) -> str | None:
  """The option letter of a dataset `solution` field such as `<answer>B</answer>`."""
  m = _GT_RE.search(solution)
  return m.group(1) if m else None


def extract_answer(text: str, valid_letters: str | None = None) -> str | None:
  """The predicted option letter, following the Video-Thinker evaluation protocol.

  The last `<answer>` body, else the text after "Final answer:", else the whole output; a leading
  capital letter (not the start of a word) wins; else the first `X:` / `[X` / `(X` / standalone `X`.
  `valid_letters` (e.g. "ABCD") restricts what counts as an option letter. Returns None when nothing
  letter-like is found (scored as wrong).
  """
  answers = _answer_bodies(text)
  if answers:
    candidate = answers[-1]
  elif "Final answer:" in text:
    candidate = text.rsplit("Final answer:", 1)[1]
  else:
    candidate = text
  letters = valid_letters or "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
  cls = f"[{re.escape(letters)}]"
  lead = re.match(rf"\s*[(\[]?({cls})(?![A-Za-z])", candidate)
  if lead:
    return lead.group(1)
  for pattern in (rf"({cls}):", rf"\[({cls})", rf"\(({cls})\)", rf"(?<![A-Za-z])({cls})(?![A-Za-z'])"):
    m = re.search(pattern, candidate)
    if m:
      return m.group(1)
  return None


def is_well_formed(text: str) -> bool:
  """The Video-Thinker format rule (`video_thinker.md`).

  At least one well-formed `<time>` `<caption>` `<think>` triplet with a parsable `MM:SS-MM:SS` window,
  equal open/close counts of the three tags with every tag inside a well-formed triplet, exactly one
  `<answer>` holding a single capital letter, and nothing but whitespace after `</answer>`.
  """
  if text.count("<answer>") != 1 or text.count("</answer>") != 1:
    return False
  answers = _answer_bodies(text)
  if len(answers) != 1:
    return False
  if not re.fullmatch(r"\s*[A-Z]\s*", answers[0]):
    return False
  body, tail = text.split("</answer>")
  if tail.strip():
    return False
  body = body.split("<answer>")[0]
  triplets = list(_TRIPLET_RE.finditer(body))
  if not triplets or any(parse_span(m.group("time")) is None for m in triplets):
    return False
  n = len(triplets)
  return all(body.count(f"<{t}>") == n and body.count(f"</{t}>") == n for t in _TAGS)
