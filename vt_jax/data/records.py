"""Video-Thinker / Video-R1 dataset records: reading, validation, video paths.

Files are a JSON list of records (Video-R1, Video-Thinker-10K) or JSON Lines, one record per line.
A record has `problem` (question), `options` (list of strings, "A. ..." style), `solution`
(`<answer>X</answer>`), `process` (the reasoning trace; SFT only), `path` (video path relative to the
video root of its `data_source`), `data_source`, `problem_type` ("multiple choice", or Video-R1's
"numerical", "OCR", "free-form", "regression"), `data_type` ("video"/"image") and optionally
`problem_id`. Every record is checked when read; problems raise `RecordError` naming the file, the
record index (0-based position in the file) and the field, so a bad dataset fails before training starts.

The SFT target is the trace followed by the answer: Video-Thinker traces may already end with
`<answer>X</answer>` (then it must agree with `solution`); Video-R1 keeps them apart and training
appends the solution after a newline (`Record.completion`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

from vt_jax import trace as trace_lib
from vt_jax.data.prompts import PromptError, option_letters

MULTIPLE_CHOICE = "multiple choice"
PROBLEM_TYPES = (MULTIPLE_CHOICE, "numerical", "OCR", "free-form", "regression")
DEFAULT_ROOT = "*"  # key of the video-root map used for data sources without their own root


class RecordError(ValueError):
  """A dataset record is invalid. `.file`, `.index` and `.field` say where."""

  def __init__(self, file: str, index: int | None, field: str | None, reason: str):
    self.file, self.index, self.field, self.reason = file, index, field, reason
    where = file + (f", record {index}" if index is not None else "") + (
        f", field {field!r}" if field is not None else "")
    super().__init__(f"{where}: {reason}")


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated record. `video_path` is resolved through the video-root map (None if no map)."""
  problem: str
  options: tuple[str, ...]
  solution: str
  answer: str | None          # option letter (multiple choice) or the text inside <answer>
  process: str | None
  path: str
  data_source: str
  problem_type: str
  data_type: str
  problem_id: Any
  source_file: str
  index: int
  video_path: str | None

  @property
  def completion(self) -> str | None:
    """The SFT target: the trace, with the solution appended unless the trace already ends in it."""
    if self.process is None:
      return None
    if trace_lib.answer_tags(self.process):
      return self.process
    return self.process.rstrip() + "\n" + self.solution.strip()

  def to_json(self) -> dict[str, Any]:
    """The record in its file format (for writing datasets back out)."""
    out = {"problem_id": self.problem_id, "problem": self.problem, "options": list(self.options),
           "solution": self.solution, "process": self.process, "path": self.path,
           "data_source": self.data_source, "problem_type": self.problem_type,
           "data_type": self.data_type}
    return {k: v for k, v in out.items() if v is not None}


def resolve_video_path(path: str, data_source: str, video_roots: Mapping[str, str] | None) -> str | None:
  """Video root of the data source (or the "*" default) joined with the record's relative path.

  Absolute paths are kept. Returns None when no map is given; raises KeyError for an unmapped source.
  """
  if video_roots is None:
    return None
  if os.path.isabs(path):
    return path
  root = video_roots.get(data_source, video_roots.get(DEFAULT_ROOT))
  if root is None:
    raise KeyError(data_source)
  return os.path.normpath(os.path.join(root, path))


def _str_field(raw: Mapping[str, Any], field: str, file: str, index: int, *, required: bool = True,
               nonempty: bool = True) -> str | None:
  if field not in raw or raw[field] is None:
    if required:
      raise RecordError(file, index, field, "missing")
    return None
  value = raw[field]
  if not isinstance(value, str):
    raise RecordError(file, index, field, f"must be a string, got {type(value).__name__}")
  if nonempty and not value.strip():
    raise RecordError(file, index, field, "empty")
  return value


def validate_record(raw: Any, file: str, index: int, *, require_trace: bool = False,
                    video_roots: Mapping[str, str] | None = None) -> Record:
  """Check one raw record (a dict from JSON) and return it as a `Record`.

  Args:
    require_trace: SFT data: `process` must be present and non-empty, and a multiple-choice trace that
      uses `<time>` tags must hold at least one well-formed `<time>`/`<caption>`/`<think>` triplet
      (Video-R1 traces are plain `<think>` text and are not checked for triplets).
    video_roots: data_source -> video root directory ("*" = default); None leaves video_path None.

  Raises:
    RecordError naming file, index and field.
  """
  if not isinstance(raw, Mapping):
    raise RecordError(file, index, None, f"a record must be a JSON object, got {type(raw).__name__}")
  problem = _str_field(raw, "problem", file, index)
  path = _str_field(raw, "path", file, index)
  data_source = _str_field(raw, "data_source", file, index, required=False) or ""
  problem_type = _str_field(raw, "problem_type", file, index, required=False) or MULTIPLE_CHOICE
  if problem_type not in PROBLEM_TYPES:
    raise RecordError(file, index, "problem_type", f"{problem_type!r} is not one of {PROBLEM_TYPES}")
  data_type = _str_field(raw, "data_type", file, index, required=False) or "video"
  if data_type not in ("video", "image"):
    raise RecordError(file, index, "data_type", f"{data_type!r} is neither 'video' nor 'image'")
  solution = _str_field(raw, "solution", file, index)
  answers = trace_lib.answer_tags(solution)
  if len(answers) != 1 or not answers[0]:
    raise RecordError(file, index, "solution",
                      f"must hold exactly one non-empty <answer>...</answer>, got {solution[:80]!r}")
  answer = answers[0]

  options_raw = raw.get("options")
  if problem_type == MULTIPLE_CHOICE:
    if options_raw is None:
      raise RecordError(file, index, "options", "missing (required for multiple choice)")
    if not isinstance(options_raw, list) or len(options_raw) < 2:
      raise RecordError(file, index, "options", "must be a list of at least 2 strings")
  options_raw = options_raw or []
  if not isinstance(options_raw, list):
    raise RecordError(file, index, "options", "must be a list of strings")
  for k, option in enumerate(options_raw):
    if not isinstance(option, str) or not option.strip():
      raise RecordError(file, index, "options", f"option {k} must be a non-empty string")
  options = tuple(options_raw)
  if problem_type == MULTIPLE_CHOICE:
    try:
      letters = option_letters(options)
    except PromptError as e:
      raise RecordError(file, index, "options", str(e)) from None
    if len(set(letters)) != len(letters):
      raise RecordError(file, index, "options", f"repeated option letters {letters!r}")
    letter = trace_lib.ground_truth_letter(solution)
    if letter is None:
      raise RecordError(file, index, "solution", f"no option letter in {solution!r}")
    if letter not in letters:
      raise RecordError(file, index, "solution",
                        f"answer {letter!r} is not among the options {letters!r}")
    answer = letter

  process = _str_field(raw, "process", file, index, required=require_trace)
  if process is not None:
    in_trace = trace_lib.answer_tags(process)
    if len(in_trace) > 1:
      raise RecordError(file, index, "process", "more than one <answer> in the trace")
    if in_trace and in_trace[0] != answer:
      raise RecordError(file, index, "process",
                        f"the trace answers {in_trace[0]!r} but the solution says {answer!r}")
    if require_trace and problem_type == MULTIPLE_CHOICE and "<time>" in process \
        and not trace_lib.parse_clues(process):
      raise RecordError(file, index, "process", "no well-formed <time>/<caption>/<think> triplet")

  try:
    video_path = resolve_video_path(path, data_source, video_roots)
  except KeyError:
    raise RecordError(file, index, "data_source",
                      f"no video root for data source {data_source!r} (known: {sorted(video_roots)}); "
                      f"add it to the video-root map or give a '{DEFAULT_ROOT}' default") from None
  return Record(problem=problem, options=options, solution=solution, answer=answer, process=process,
                path=path, data_source=data_source, problem_type=problem_type, data_type=data_type,
                problem_id=raw.get("problem_id"), source_file=file, index=index,
                video_path=video_path)


def _load_raw(file: str) -> list[Any]:
  text = pathlib.Path(file).read_text(encoding="utf-8")
  stripped = text.lstrip()
  if stripped.startswith("["):
    try:
      data = json.loads(text)
    except json.JSONDecodeError as e:
      raise RecordError(file, None, None, f"invalid JSON: {e}") from None
    if not isinstance(data, list):
      raise RecordError(file, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    return data
  records = []
  for line_no, line in enumerate(text.splitlines()):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise RecordError(file, len(records), None, f"line {line_no + 1}: invalid JSON: {e}") from None
  return records


def read_records(files: str | os.PathLike | Sequence[str | os.PathLike], *,
                 video_roots: Mapping[str, str] | None = None, require_trace: bool = False,
                 data_types: Iterable[str] | None = None) -> list[Record]:
  """Read and validate every record of one or more JSON / JSONL files, in file order.

  data_types: keep only these data types (Video-R1 mixes images and videos); None keeps all.
  Raises RecordError on the first invalid record (the whole dataset is checked up front).
  """
  if isinstance(files, (str, os.PathLike)):
    files = [files]
  keep = None if data_types is None else set(data_types)
  out = []
  for file in map(os.fspath, files):
    if not os.path.exists(file):
      raise RecordError(file, None, None, "file not found")
    for index, raw in enumerate(_load_raw(file)):
      record = validate_record(raw, file, index, require_trace=require_trace, video_roots=video_roots)
      if keep is None or record.data_type in keep:
        out.append(record)
  return out


def parse_video_roots(specs: Iterable[str]) -> dict[str, str]:
  """`["activitynet=/data/anet", "/data/videos"]` -> `{"activitynet": ..., "*": "/data/videos"}`."""
  roots = {}
  for spec in specs:
    source, sep, root = spec.partition("=")
    if not sep:
      source, root = DEFAULT_ROOT, spec
    roots[source.strip()] = root.strip()
  return roots
