"""Benchmark adapters: each public annotation format read as published into one canonical `EvalItem`.

The formats (field names, option layouts, answer forms, time units, path quirks) are described in
`shared/reference/benchmark_formats.md`; each adapter below names the section it follows. Every adapter
is strict: a record it cannot read raises `BenchmarkFormatError` naming the file, the record index and
the field, so a malformed or mislabelled annotation never turns into silently wrong numbers.

Videos are resolved against `video_root` but never required to exist here: the runner counts and lists
missing videos instead of dropping their items.

    items = load_benchmark("video_holmes", "Benchmark/test_Video-Holmes.json", "Benchmark")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Iterable, Sequence

from vt_jax import trace

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")


class BenchmarkFormatError(ValueError):
  """A record that does not follow its benchmark's published format."""

  def __init__(self, path: str, index: int | None, field: str | None, reason: str):
    self.path, self.index, self.field, self.reason = path, index, field, reason
    where = path if index is None else f"{path}, record {index}"
    if field is not None:
      where += f", field {field!r}"
    super().__init__(f"{where}: {reason}")


@dataclasses.dataclass
class EvalItem:
  """One multiple-choice question, whatever benchmark it came from.

  id: unique within the benchmark (the resume key of `predictions.jsonl`).
  video_path: resolved against the video root; may not exist (counted as missing by the runner).
  options: `["A. text", "B. text", ...]`, letters consecutive from A.
  answer: the ground-truth letter.
  category: one type name, or a list of them for multi-label benchmarks (LVBench).
  gt_spans: ground-truth evidence windows `[(start_s, end_s), ...]` in seconds of the full video.
  reference_captions: reference captions; when as many as `gt_spans`, caption i describes span i.
  start, end: the clip of the video the question is about (STAR), seconds; None = whole video.
  raw: the source record, for prompt variants that need more (e.g. VRBench's `video_summary`).
  """
  id: str
  benchmark: str
  video_path: str
  question: str
  options: list[str]
  answer: str
  category: str | list[str]
  gt_spans: list[tuple[float, float]] = dataclasses.field(default_factory=list)
  reference_captions: list[str] = dataclasses.field(default_factory=list)
  start: float | None = None
  end: float | None = None
  raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def letters(self) -> str:
    """The valid option letters, e.g. "ABCDEF"."""
    return LETTERS[:len(self.options)]

  @property
  def categories(self) -> list[str]:
    """`category` as a list (a question counts once in each of its categories)."""
    return list(self.category) if isinstance(self.category, list) else [self.category]

  @property
  def option_texts(self) -> list[str]:
    """The options without their "X. " prefix."""
    return [o.split(". ", 1)[1] if ". " in o else o for o in self.options]


# ----------------------------------------------------------------------------------------------------
# Reading helpers shared by the adapters.


def read_records(path: str) -> list[Any]:
  """A JSON list, or JSONL (one record per line); the error names the file (and line for JSONL)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    raise BenchmarkFormatError(path, None, None, f"cannot read annotation file: {e}") from e
  stripped = text.lstrip()
  if stripped.startswith("["):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise BenchmarkFormatError(path, None, None, f"not valid JSON: {e}") from e
    if not isinstance(records, list):
      raise BenchmarkFormatError(path, None, None, "expected a JSON list of records")
    return records
  records = []
  for lineno, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise BenchmarkFormatError(path, len(records), None,
                                 f"line {lineno + 1} is not valid JSON: {e}") from e
  if not records:
    raise BenchmarkFormatError(path, None, None, "empty annotation file")
  return records


class _Record:
  """Typed field access on one record, with errors that say where."""

  def __init__(self, path: str, index: int, record: Any, prefix: str = ""):
    if not isinstance(record, dict):
      raise BenchmarkFormatError(path, index, None, f"expected a JSON object, got {type(record).__name__}")
    self.path, self.index, self.record, self.prefix = path, index, record, prefix

  def error(self, field: str | None, reason: str) -> BenchmarkFormatError:
    return BenchmarkFormatError(self.path, self.index, None if field is None else self.prefix + field, reason)

  def get(self, field: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    """The field's value, type-checked; an optional field (default given) may be absent or null."""
    if field not in self.record or (default is not ... and self.record[field] is None):
      if default is not ...:
        return default
      raise self.error(field, f"missing (record has {sorted(self.record)})")
    value = self.record[field]
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
      names = "/".join(t.__name__ for t in _as_tuple(types))
      raise self.error(field, f"expected {names}, got {type(value).__name__}: {value!r:.80}")
    return value

  def text(self, field: str) -> str:
    value = self.get(field, str)
    if not value.strip():
      raise self.error(field, "empty")
    return value

  def ident(self, field: str) -> str:
    """An id stored as int or str (both occur); normalised with str() as the official scorers do."""
    return str(self.get(field, (int, str)))

  def sub(self, field: str) -> _Record:
    return _Record(self.path, self.index, self.get(field, dict), prefix=f"{self.prefix}{field}.")


def _as_tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
  return types if isinstance(types, tuple) else (types,)


def _options_from_dict(rec: _Record, field: str) -> list[str]:
  """`{"A": text, ...}` -> ["A. text", ...], sorted by letter; letters must run A, B, C, ... ."""
  options = rec.get(field, dict)
  keys = sorted(options)
  if not keys or keys != list(LETTERS[:len(keys)]):
    raise rec.error(field, f"option keys must be consecutive letters from A, got {list(options)}")
  for k in keys:
    if not isinstance(options[k], str):
      raise rec.error(f"{field}.{k}", f"expected str, got {type(options[k]).__name__}")
  return [f"{k}. {options[k].strip()}" for k in keys]


def _options_from_texts(rec: _Record, field: str, texts: Sequence[Any]) -> list[str]:
  """Plain option texts (no letters) -> ["A. text", ...]."""
  if not texts or len(texts) > len(LETTERS):
    raise rec.error(field, f"expected 1..{len(LETTERS)} options, got {len(texts)}")
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise rec.error(f"{field}[{i}]", f"expected str, got {type(t).__name__}")
  return [f"{LETTERS[i]}. {t.strip()}" for i, t in enumerate(texts)]


def _letter(rec: _Record, field: str, n_options: int) -> str:
  """A ground-truth answer letter, upper-cased (one LVBench fixture has a lower-case one)."""
  value = rec.text(field).strip().upper()
  if len(value) != 1 or value not in LETTERS[:n_options]:
    raise rec.error(field, f"expected one of {LETTERS[:n_options]!r}, got {rec.record[field]!r}")
  return value


def _spans_seconds(rec: _Record, field: str) -> list[tuple[float, float]]:
  """`[[start, end], ...]` in seconds (int or float)."""
  return [_span_seconds(rec, f"{field}[{i}]", span) for i, span in enumerate(rec.get(field, list))]


def _span_seconds(rec: _Record, label: str, span: Any) -> tuple[float, float]:
  ok = (isinstance(span, (list, tuple)) and len(span) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in span))
  if not ok or span[1] < span[0]:
    raise rec.error(label, f"expected [start, end] in seconds with start <= end, got {span!r}")
  return float(span[0]), float(span[1])


_BRACKET_SPAN_RE = re.compile(r"\[\s*([\d:.]+)\s*->\s*([\d:.]+)\s*\]")


def bracket_spans(text: str) -> list[tuple[float, float]]:
  """VRBench step spans `[HH:MM:SS->HH:MM:SS]` inside free text -> [(start_s, end_s), ...]."""
  spans = []
  for a, b in _BRACKET_SPAN_RE.findall(text):
    start, end = trace.parse_timestamp(a), trace.parse_timestamp(b)
    if start is not None and end is not None and end >= start:
      spans.append((start, end))
  return spans


class VideoResolver:
  """Finds a video under a root: explicit relative candidates first, then by basename anywhere below.

  Archive layouts differ from the annotation paths (`videos/` vs `videos_cropped/`, `v001` vs
  `v001_360p`, `./Evaluation/` prefixes), so the basename index is the fallback; it is built once, on
  the first miss. A basename found in more than one place is ambiguous and is not used (a wrong video
  would silently give wrong answers). A video found nowhere resolves to the first candidate (the path
  the format implies), which the runner then reports as missing.
  """

  def __init__(self, root: str, search_by_basename: bool = True):
    self.root = root
    self.search_by_basename = search_by_basename
    self._index: dict[str, str] | None = None

  def _basename_index(self) -> dict[str, str | None]:
    """file name -> its path under root, or None when several files share the name."""
    if self._index is None:
      self._index = {}
      if os.path.isdir(self.root):
        for dirpath, _, filenames in os.walk(self.root):
          for name in filenames:
            if name.endswith(VIDEO_EXTENSIONS):
              self._index[name] = None if name in self._index else os.path.join(dirpath, name)
    return self._index

  def resolve(self, candidates: Sequence[str], stem: str | None = None) -> str:
    """candidates: relative paths in order of preference; stem: file name without extension to search."""
    paths = [c if os.path.isabs(c) else os.path.join(self.root, c) for c in candidates]
    for p in paths:
      if os.path.isfile(p):
        return p
    if self.search_by_basename:
      index = self._basename_index()
      names = [os.path.basename(c) for c in candidates]
      if stem is not None:
        names += [stem + ext for ext in VIDEO_EXTENSIONS]
      for name in names:
        if index.get(name):
          return index[name]
        if name in index:
          log.warning("%s: several files named %s; not guessing which is meant", self.root, name)
    return paths[0]


def _with_extensions(folders: Iterable[str], stem: str) -> list[str]:
  return [os.path.join(folder, stem + ext) for folder in folders for ext in VIDEO_EXTENSIONS]


# ----------------------------------------------------------------------------------------------------
# Adapters. Signature: (annotation path, video root, **options) -> list[EvalItem].


def load_video_holmes(annotation: str, video_root: str, search_by_basename: bool = True) -> list[EvalItem]:
  """Video-Holmes `test_Video-Holmes.json` (benchmark_formats.md §1).

  Keys with spaces ("video ID", "Question ID", "Question Type"), options as a letter dict (A-F),
  letter answers; id = "{video ID}_{Question ID}". Videos under videos/, videos_cropped/ or video/.
  """
  resolver = VideoResolver(video_root, search_by_basename)
  items = []
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    video_id = rec.text("video ID").strip()
    options = _options_from_dict(rec, "Options")
    items.append(EvalItem(
        id=f"{video_id}_{rec.ident('Question ID')}",
        benchmark="video_holmes",
        video_path=resolver.resolve(_with_extensions(("videos", "videos_cropped", "video", ""), video_id),
                                    stem=video_id),
        question=rec.text("Question"),
        options=options,
        answer=_letter(rec, "Answer", len(options)),
        category=rec.text("Question Type").strip(),
        raw=raw,
    ))
  return items


VIDEO_HOLMES_TYPES = ("SR", "IMC", "TCI", "TA", "MHR", "PAR", "CTI")

CG_BENCH_SUBSETS = ("cognition", "perception", "hallucination", "all")


def _cg_subset_match(subset: str, sub_category: str) -> bool:
  if subset == "all":
    return True
  if subset == "cognition":
    return sub_category.endswith("Cognition")
  if subset == "perception":
    return sub_category.endswith("Perception")
  return sub_category == "Hallucination"


def load_cg_bench(annotation: str, video_root: str, subset: str = "cognition",
                  sub_categories: Sequence[str] | None = None,
                  search_by_basename: bool = True) -> list[EvalItem]:
  """CG-Bench `cgbench.json` / `cgbench_mini.json` (benchmark_formats.md §2).

  Choices are plain texts (letter = index), `right_answer` is the letter, `clue_intervals` are
  `[start, end]` seconds (the gt spans). `subset` selects the "reasoning" part: "cognition" (default;
  `sub_category` ending in "Cognition", the likely but UNCONFIRMED meaning of CG-Bench-Reasoning),
  "perception", "hallucination" or "all"; `sub_categories` (exact names) overrides it.
  """
  if sub_categories is None and subset not in CG_BENCH_SUBSETS:
    raise ValueError(f"cg_bench subset must be one of {CG_BENCH_SUBSETS}, got {subset!r}")
  wanted = set(sub_categories) if sub_categories is not None else None
  resolver = VideoResolver(video_root, search_by_basename)
  items = []
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    sub_category = rec.text("sub_category").strip()
    keep = sub_category in wanted if wanted is not None else _cg_subset_match(subset, sub_category)
    if not keep:
      continue
    choices = rec.get("choices", list)
    options = _options_from_texts(rec, "choices", choices)
    if "right_answer" in raw:
      answer = _letter(rec, "right_answer", len(options))
    else:  # the letter is authoritative; fall back to the answer text only when it is absent
      answer = _letter_of_text(rec, "answer", [c.strip() for c in choices])
    video_uid = rec.text("video_uid").strip()
    items.append(EvalItem(
        id=rec.ident("qid"),
        benchmark="cg_bench",
        video_path=resolver.resolve(_with_extensions(("cg_videos_720p", "videos", ""), video_uid),
                                    stem=video_uid),
        question=rec.text("question"),
        options=options,
        answer=answer,
        category=sub_category,
        gt_spans=_spans_seconds(rec, "clue_intervals") if "clue_intervals" in raw else [],
        raw=raw,
    ))
  return items


def _letter_of_text(rec: _Record, field: str, texts: Sequence[str]) -> str:
  """The letter of the option whose text equals the answer text (stripped); loud if none or several."""
  answer = rec.text(field).strip()
  hits = [i for i, t in enumerate(texts) if t == answer]
  if len(hits) != 1:
    raise rec.error(field, f"answer text {answer!r} matches {len(hits)} of the options {list(texts)}")
  return LETTERS[hits[0]]


def load_vrbench(annotation: str, video_root: str, search_by_basename: bool = True) -> list[EvalItem]:
  """VRBench `VRBench_eval.jsonl`, MCQ outcome part (benchmark_formats.md §3).

  One line per video holding `mcq: {"qa1": {...}, ...}`; id = "{video_id}_{qa_k}"; options a letter
  dict; category = `reasoning_type`; gt spans = the `[HH:MM:SS->HH:MM:SS]` spans of the reasoning
  steps. The record's `video_summary` stays in `raw["video"]` (the official prompt includes it, the
  third-party ones do not: a prompt variant decides).
  """
  resolver = VideoResolver(video_root, search_by_basename)
  items = []
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    video_id = rec.text("video_id").strip()
    video_path = rec.text("video_path").strip()
    candidates = [video_path] + _with_extensions(("videos", "v001", "v001_360p", "videos/v001_360p", ""),
                                                 video_id)
    resolved = resolver.resolve(candidates, stem=video_id)
    video = {k: v for k, v in raw.items() if k != "mcq"}
    mcq = rec.sub("mcq")
    for qa_key in sorted(mcq.record, key=_natural_key):
      qa = mcq.sub(qa_key)
      options = _options_from_dict(qa, "options")
      steps = qa.get("reasoning_process", (dict, list), default={})
      step_texts = steps.values() if isinstance(steps, dict) else steps
      spans = [s for t in step_texts if isinstance(t, str) for s in bracket_spans(t)]
      items.append(EvalItem(
          id=f"{video_id}_{qa_key}",
          benchmark="vrbench",
          video_path=resolved,
          question=qa.text("question"),
          options=options,
          answer=_letter(qa, "answer", len(options)),
          category=qa.text("reasoning_type").strip(),
          gt_spans=spans,
          raw={"video": video, "qa_key": qa_key, "qa": qa.record},
      ))
  return items


def _natural_key(key: str) -> tuple:
  """"qa2" before "qa10"."""
  return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key))


def load_star(annotation: str, video_root: str, search_by_basename: bool = True) -> list[EvalItem]:
  """STAR `STAR_val.json` (benchmark_formats.md §4).

  Choices are `{choice_id, choice, ...}` dicts (letter = "ABCD"[choice_id]); the answer is TEXT and
  must equal exactly one choice; category = `question_id` prefix (Interaction/Sequence/...);
  `start`/`end` (seconds) are the clip of the Charades video the question is about.
  """
  resolver = VideoResolver(video_root, search_by_basename)
  items = []
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    question_id = rec.text("question_id").strip()
    choices = rec.get("choices", list)
    texts = []
    for j, c in enumerate(choices):
      choice = _Record(annotation, i, c, prefix=f"choices[{j}].")
      if choice.get("choice_id", int, default=j) != j:
        raise choice.error("choice_id", f"expected {j} (choices must be listed in choice_id order)")
      texts.append(choice.text("choice").strip())
    options = _options_from_texts(rec, "choices", texts)
    start = rec.get("start", (int, float), default=None)
    end = rec.get("end", (int, float), default=None)
    if start is not None and end is not None and end < start:
      raise rec.error("end", f"clip end {end} is before start {start}")
    video_id = rec.text("video_id").strip()
    items.append(EvalItem(
        id=question_id,
        benchmark="star",
        video_path=resolver.resolve(_with_extensions(("Charades_v1_480", "videos", ""), video_id),
                                    stem=video_id),
        question=rec.text("question"),
        options=options,
        answer=_letter_of_text(rec, "answer", texts),
        category=question_id.split("_", 1)[0],
        start=None if start is None else float(start),
        end=None if end is None else float(end),
        raw=raw,
    ))
  return items


_INLINE_OPTION_RE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$")


def _inline_options(rec: _Record, field: str) -> tuple[str, list[str]]:
  """LVBench question text "stem\\n(A) x\\n(B) y..." -> (stem, ["A. x", "B. y", ...])."""
  stem_lines, options = [], []
  for line in rec.text(field).split("\n"):
    m = _INLINE_OPTION_RE.match(line)
    if m:
      if m.group(1) != LETTERS[len(options)]:
        raise rec.error(field, f"inline options must run (A), (B), ...; found ({m.group(1)}) "
                               f"after {len(options)} option(s)")
      options.append(f"{m.group(1)}. {m.group(2).strip()}")
    elif options:
      if line.strip():  # an option text wrapped onto the next line
        options[-1] += " " + line.strip()
    else:
      stem_lines.append(line)
  stem = "\n".join(stem_lines).strip()
  if not options or not stem:
    raise rec.error(field, "expected a question line followed by inline options '(A) ...'")
  return stem, options


def load_lvbench(annotation: str, video_root: str, search_by_basename: bool = True) -> list[EvalItem]:
  """LVBench `video_info.meta.jsonl` (benchmark_formats.md §5).

  One line per video holding `qa: [...]`; options inline in `question` as "(A) ..." lines; letter
  answer (upper-cased); `question_type` a LIST (multi-label: counted in each); `time_reference`
  "MM:SS-MM:SS" or "HH:MM:SS-HH:MM:SS" -> the gt span in seconds. id = str(uid), as the scorer keys it.
  """
  resolver = VideoResolver(video_root, search_by_basename)
  items = []
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    key = rec.text("key").strip()
    video_path = resolver.resolve(_with_extensions(("", "videos", "data/videos"), key), stem=key)
    for j, qa_raw in enumerate(rec.get("qa", list)):
      qa = _Record(annotation, i, qa_raw, prefix=f"qa[{j}].")
      question, options = _inline_options(qa, "question")
      qtypes = qa.get("question_type", (list, str))
      qtypes = [qtypes] if isinstance(qtypes, str) else qtypes
      if not qtypes or not all(isinstance(t, str) and t.strip() for t in qtypes):
        raise qa.error("question_type", f"expected a non-empty list of type names, got {qtypes!r}")
      spans = []
      ref = qa.get("time_reference", str, default="")
      if ref.strip():
        span = trace.parse_span(ref.strip())
        if span is None:
          raise qa.error("time_reference", f"expected 'MM:SS-MM:SS' or 'HH:MM:SS-HH:MM:SS', got {ref!r}")
        spans.append(span)
      items.append(EvalItem(
          id=qa.ident("uid"),
          benchmark="lvbench",
          video_path=video_path,
          question=question,
          options=options,
          answer=_letter(qa, "answer", len(options)),
          category=[t.strip() for t in qtypes],
          gt_spans=spans,
          raw={"video": {k: v for k, v in raw.items() if k != "qa"}, "qa": qa_raw},
      ))
  return items


_PREFIXED_OPTION_RE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*)$", re.S)
_CATEGORY_FIELDS = ("category", "question_type", "original_question_type", "data_source")


def load_video_r1(annotation: str, video_root: str, benchmark: str = "video_r1",
                  video_roots: dict[str, str] | None = None, strip_evaluation_prefix: bool = True,
                  gt_from_process: bool = False, search_by_basename: bool = False) -> list[EvalItem]:
  """Video-R1 / Video-Thinker JSON (list) or JSONL (benchmark_formats.md §6, video_thinker.md "Data").

  `options` are "A. text" strings; `solution` is "<answer>X</answer>"; `path` is relative and may begin
  "./Evaluation/<Bench>/..." (the official script's double "Evaluation" quirk: we strip "./" and try with
  and without the "Evaluation/" prefix). `video_roots` maps `data_source` to its own root (the
  Video-Thinker layout). The paths are explicit and basenames repeat across sub-benchmarks, so search
  by basename is off unless asked for. Only `problem_type == "multiple choice"` (or absent) is scored; other types
  are skipped with a logged count, since they have no option letter.

  Optional fields: the category (first present of `category`, `question_type`,
  `original_question_type`, `data_source`; else the benchmark name); `gt_spans` or `segments` (list of
  [s, e] seconds or "MM:SS-MM:SS" strings); `captions` (reference captions, aligned with the spans);
  `start`/`end`.
  With `gt_from_process`, the `<time>` windows and `<caption>`s of the record's `process` trace become
  the gt spans and reference captions (the in-domain test traces were written from annotated segments).
  """
  items, skipped = [], 0
  resolvers: dict[str, VideoResolver] = {}
  for i, raw in enumerate(read_records(annotation)):
    rec = _Record(annotation, i, raw)
    problem_type = rec.get("problem_type", str, default="multiple choice")
    if problem_type.strip().lower() != "multiple choice":
      skipped += 1
      continue
    options = _prefixed_options(rec, "options")
    answer = trace.ground_truth_letter(rec.text("solution"))
    if answer is None or answer not in LETTERS[:len(options)]:
      raise rec.error("solution", f"expected '<answer>X</answer>' with X in {LETTERS[:len(options)]!r}, "
                                  f"got {raw['solution']!r}")
    source = rec.get("data_source", str, default=None)
    root = (video_roots or {}).get(source, video_root) if source else video_root
    resolver = resolvers.setdefault(root, VideoResolver(root, search_by_basename))
    rel = rec.text("path").strip()
    candidates = _video_r1_candidates(rel, strip_evaluation_prefix)
    category = next((raw[f] for f in _CATEGORY_FIELDS if isinstance(raw.get(f), (str, list)) and raw[f]),
                    benchmark)
    spans, captions = _optional_spans(rec), _optional_captions(rec)
    if gt_from_process and "process" in raw:
      process = rec.text("process")
      clues = trace.parse_clues(process)
      spans = spans or [(c.start, c.end) for c in clues] or trace.time_windows(process)
      captions = captions or [c.caption for c in clues]
    start = rec.get("start", (int, float), default=None)
    end = rec.get("end", (int, float), default=None)
    problem_id = raw.get("problem_id", raw.get("id", i))
    items.append(EvalItem(
        id=str(problem_id),
        benchmark=benchmark,
        video_path=resolver.resolve(candidates),
        question=rec.text("problem"),
        options=options,
        answer=answer,
        category=category,
        gt_spans=spans,
        reference_captions=captions,
        start=None if start is None else float(start),
        end=None if end is None else float(end),
        raw=raw,
    ))
  if skipped:
    log.warning("%s: skipped %d record(s) whose problem_type is not 'multiple choice'", annotation, skipped)
  return items


def _prefixed_options(rec: _Record, field: str) -> list[str]:
  """Options as "A. text" strings (also accepts "(A) text" / "A: text"); letters must run A, B, ..."""
  options = rec.get(field, list)
  if not options:
    raise rec.error(field, "no options (a multiple-choice record needs them)")
  out = []
  for j, opt in enumerate(options):
    m = _PREFIXED_OPTION_RE.match(opt) if isinstance(opt, str) else None
    if m is None or m.group(1) != LETTERS[j]:
      raise rec.error(f"{field}[{j}]", f"expected a string starting '{LETTERS[j]}. ', got {opt!r:.80}")
    out.append(f"{LETTERS[j]}. {m.group(2).strip()}")
  return out


def _video_r1_candidates(rel: str, strip_evaluation_prefix: bool) -> list[str]:
  rel = rel[2:] if rel.startswith("./") else rel.lstrip("/") if not os.path.isabs(rel) else rel
  candidates = [rel]
  if strip_evaluation_prefix and rel.startswith("Evaluation/"):
    candidates.append(rel[len("Evaluation/"):])
  return candidates


def _optional_spans(rec: _Record) -> list[tuple[float, float]]:
  """`gt_spans` or `segments` (the synthetic set's name): [s, e] seconds or "MM:SS-MM:SS" strings."""
  field = next((f for f in ("gt_spans", "segments") if f in rec.record), None)
  if field is None:
    return []
  spans = []
  for j, s in enumerate(rec.get(field, list)):
    if isinstance(s, str):
      span = trace.parse_span(s.strip())
      if span is None:
        raise rec.error(f"{field}[{j}]", f"expected 'MM:SS-MM:SS', got {s!r}")
      spans.append(span)
    else:
      spans.append(_span_seconds(rec, f"{field}[{j}]", s))
  return spans


def _optional_captions(rec: _Record) -> list[str]:
  captions = rec.get("captions", (list, str), default=[])
  captions = [captions] if isinstance(captions, str) else captions
  for j, c in enumerate(captions):
    if not isinstance(c, str):
      raise rec.error(f"captions[{j}]", f"expected str, got {type(c).__name__}")
  return list(captions)


def _video_r1_named(benchmark: str, **defaults: Any) -> Callable[..., list[EvalItem]]:
  def load(annotation: str, video_root: str, **opts: Any) -> list[EvalItem]:
    return load_video_r1(annotation, video_root, benchmark=benchmark, **{**defaults, **opts})
  load.__doc__ = f"{benchmark}: a Video-R1-style JSON (see load_video_r1)."
  return load


Adapter = Callable[..., list[EvalItem]]

BENCHMARKS: dict[str, Adapter] = {
    "video_holmes": load_video_holmes,
    "cg_bench": load_cg_bench,
    "vrbench": load_vrbench,
    "star": load_star,
    "lvbench": load_lvbench,
    "activitynet": _video_r1_named("activitynet"),
    "youcook2": _video_r1_named("youcook2"),
    "scalelong": _video_r1_named("scalelong"),
    "video_r1": load_video_r1,
    # vt_jax.data.synthetic's test.json: its reference traces' windows are the gt segments, so their
    # captions are the reference captions of the grounding/caption metrics.
    "synthetic": _video_r1_named("synthetic", gt_from_process=True),
}


def load_benchmark(name: str, annotation: str, video_root: str, **opts: Any) -> list[EvalItem]:
  """Read `annotation` with the adapter registered as `name`; ids are checked to be unique.

  opts go to the adapter (e.g. `subset="all"` for cg_bench, `video_roots={...}` for Video-R1 JSON).
  """
  if name not in BENCHMARKS:
    raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
  items = BENCHMARKS[name](annotation, video_root, **opts)
  seen: dict[str, int] = {}
  for k, item in enumerate(items):
    if item.id in seen:
      raise BenchmarkFormatError(annotation, None, None,
                                 f"duplicate item id {item.id!r} (items {seen[item.id]} and {k}); "
                                 "ids key the resumable predictions file and must be unique")
    seen[item.id] = k
  return items
