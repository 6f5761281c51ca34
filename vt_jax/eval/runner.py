"""The evaluation loop: items in, streamed predictions, metrics, a report and plots out.

    summary = run_eval(items, generate_fn, "runs/eval/holmes16", batch_size=8, nframes=16, model="ckpt")

The model stays behind `generate_fn(list[EvalItem]) -> list[GenerationResult]`, one result per item, in
order; a video it cannot decode comes back as a result with `error` set, or as a raised `VideoError`
(any of `item_errors`), after which the batch is retried item by item to find the bad one. Videos
that do not exist are found here, before any generation, and recorded as missing.

Outputs in `out_dir`:
  predictions.jsonl   one line per item, appended and flushed as soon as it is known; a rerun with the
                      same out_dir skips the ids already there (a half-written last line is dropped).
                      With several processes (a pod: one model replica per host) each process takes every
                      n-th item still to do and appends to its own `predictions.part-<i>-of-<n>.jsonl`;
                      process 0 moves the parts into predictions.jsonl at the end, or, after a run was
                      interrupted, when the next one starts. out_dir must be on storage they all see.
  run.json            what the predictions were made with (benchmark, frames, model, options); a rerun
                      that disagrees is refused rather than mixing two settings in one file.
  metrics.json        {"run": {...}, "metrics": compute_metrics(all predictions)}.
  report.md, per_category_accuracy.png   (see vt_jax.eval.report).
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

from tqdm import tqdm

from vt_jax.data.video import VideoError, VideoSampling
from vt_jax.eval import metrics as metrics_lib
from vt_jax.eval import report as report_lib
from vt_jax.eval.benchmarks import EvalItem
from vt_jax.train import distributed

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
PART_FILE = "predictions.part-{index}-of-{count}.jsonl"
RUN_FILE = "run.json"
# How long a process that finished its share waits for the others (generation times differ by item).
FINISH_TIMEOUT_S = 24 * 3600
_CALLS = itertools.count()  # names each run_eval call's exchanges between processes (same order everywhere)


@dataclasses.dataclass
class GenerationResult:
  """The model's output for one item.

  text: the decoded completion (special tokens removed). num_tokens: its length in tokens (None if the
  backend does not count; lengths are then reported in words). error: set when the item's video could
  not be read (e.g. a caught `VideoError`: "VideoError: <path>: <reason>"); text is ignored then.
  """
  text: str = ""
  num_tokens: int | None = None
  error: str | None = None


GenerateFn = Callable[[list[EvalItem]], list[GenerationResult]]


def item_sampling(item: EvalItem, sampling: VideoSampling) -> VideoSampling:
  """The run's frame sampling for one item, restricted to the item's clip (STAR's start/end) if any."""
  if item.start is None and item.end is None:
    return sampling
  return dataclasses.replace(sampling, start=item.start, end=item.end)


class PredictionsFileError(ValueError):
  """predictions.jsonl / run.json in out_dir do not belong to this evaluation."""


def read_predictions(path: str, repair: bool = False) -> dict[str, metrics_lib.PredictionRecord]:
  """Records of a predictions file by id.

  A run killed mid-write can leave an unterminated last line: if it parses it is kept, else dropped;
  with `repair` the file is then fixed (newline added / partial line cut) so appending continues on a
  clean line. A bad line anywhere else is an error.
  """
  if not os.path.exists(path):
    return {}
  with open(path, "rb") as f:
    data = f.read()
  end = data.rfind(b"\n") + 1  # bytes of the newline-terminated lines
  records: dict[str, metrics_lib.PredictionRecord] = {}
  for lineno, line in enumerate(data[:end].split(b"\n")[:-1]):
    if line.strip():
      try:
        rec = metrics_lib.PredictionRecord.from_json(json.loads(line))
      except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise PredictionsFileError(f"{path}, line {lineno + 1}: not a prediction record ({e})") from e
      records[rec.id] = rec
  tail = data[end:]
  if tail.strip():
    try:
      rec = metrics_lib.PredictionRecord.from_json(json.loads(tail))
      records[rec.id] = rec
      fix = "newline"
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError):
      log.warning("%s: dropping a partial last line (%d bytes)", path, len(tail))
      fix = "truncate"
    if repair:
      with open(path, "r+b") as f:
        if fix == "truncate":
          f.truncate(end)
        else:
          f.seek(0, os.SEEK_END)
          f.write(b"\n")
  return records


def _record(item: EvalItem, status: str, result: GenerationResult | None = None,
            error: str | None = None) -> metrics_lib.PredictionRecord:
  return metrics_lib.PredictionRecord(
      id=item.id, benchmark=item.benchmark, video_path=item.video_path, categories=item.categories,
      answer=item.answer, letters=item.letters, status=status,
      text=result.text if result is not None and status == metrics_lib.STATUS_OK else "",
      num_tokens=result.num_tokens if result is not None and status == metrics_lib.STATUS_OK else None,
      error=error, gt_spans=list(item.gt_spans), reference_captions=list(item.reference_captions),
  ).scored()


def _check_results(batch: Sequence[EvalItem], results: Any) -> list[GenerationResult]:
  if not isinstance(results, (list, tuple)) or len(results) != len(batch):
    n = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
    raise TypeError(f"generate_fn returned {n} results for a batch of {len(batch)} items")
  for r in results:
    if not isinstance(r, GenerationResult):
      raise TypeError(f"generate_fn must return GenerationResult objects, got {type(r).__name__}")
  return list(results)


def _generate(batch: list[EvalItem], generate_fn: GenerateFn,
              item_errors: tuple[type[BaseException], ...]) -> list[GenerationResult]:
  """One batch; if it raises one of `item_errors`, item by item so one bad video costs only itself."""
  try:
    return _check_results(batch, generate_fn(batch))
  except item_errors as e:
    if len(batch) == 1:
      return [GenerationResult(error=f"{type(e).__name__}: {e}")]
    log.warning("batch failed (%s: %s); retrying its %d items one by one", type(e).__name__, e, len(batch))
  return [r for item in batch for r in _generate([item], generate_fn, item_errors)]


def _check_run_identity(out_dir: str, identity: dict[str, Any]) -> None:
  path = os.path.join(out_dir, RUN_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    if previous != identity:
      raise PredictionsFileError(
          f"{out_dir} holds predictions made with {previous}, not {identity}; use another --out "
          "(or delete the directory) instead of mixing two settings in one predictions file")
  else:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(identity, f, indent=1, sort_keys=True)


def merge_parts(out_dir: str) -> int:
  """Moves the records of per-process part files (`PART_FILE`, of a finished or an interrupted run with
  any number of processes) into predictions.jsonl, skipping ids it already holds, and deletes the parts.
  Returns how many records were added."""
  parts = sorted(glob.glob(os.path.join(out_dir, PART_FILE.format(index="*", count="*"))))
  if not parts:
    return 0
  pred_path = os.path.join(out_dir, PREDICTIONS_FILE)
  done = read_predictions(pred_path, repair=True)
  added = []
  for part in parts:
    for rec_id, rec in read_predictions(part).items():
      if rec_id not in done:
        done[rec_id] = rec
        added.append(rec)
  with open(pred_path, "a", encoding="utf-8") as f:
    for rec in added:
      f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())
  for part in parts:  # only once their records are safely in predictions.jsonl
    os.remove(part)
  return len(added)


def run_eval(items: Sequence[EvalItem], generate_fn: GenerateFn, out_dir: str, batch_size: int = 8, *,
             nframes: int = 16, model: str = "model", benchmark: str | None = None,
             options: dict[str, Any] | None = None,
             item_errors: tuple[type[BaseException], ...] = (VideoError,),
             progress: bool = True, process: distributed.ProcessInfo | None = None) -> dict[str, Any]:
  """Evaluates `items` (resuming from out_dir/predictions.jsonl) and writes metrics, report and plots.

  items: the benchmark's items (ids unique). generate_fn: see module docstring; called with at most
  `batch_size` items whose videos exist. nframes/model/options describe the run (they name the report
  and guard resumption). item_errors: exception types from generate_fn that mean "this item's video is
  unreadable" (default: the frame loader's `VideoError`, so a generate_fn may simply let
  `load_video` raise); others propagate (the run can then be resumed).
  process: this process of a multi-process evaluation (every process calls run_eval with the same items;
  each generates its share, module docstring); default: a single process.
  Returns the summary written to metrics.json: {"run": {...}, "metrics": {...}} (on every process).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  ids = [it.id for it in items]
  if len(set(ids)) != len(ids):
    raise ValueError("item ids are not unique; load items with vt_jax.eval.benchmarks.load_benchmark")
  index, count = (process.index, process.count) if process is not None else (0, 1)
  exchange = f"vt_jax.eval.run_eval/{next(_CALLS)}"
  benchmark = benchmark or ",".join(sorted({it.benchmark for it in items})) or "unknown"
  os.makedirs(out_dir, exist_ok=True)
  identity = {"benchmark": benchmark, "nframes": int(nframes), "model": model, "options": options or {}}
  pred_path = os.path.join(out_dir, PREDICTIONS_FILE)

  # Process 0 owns the run's files: it checks them, folds in the parts of an interrupted multi-process
  # run, and tells the others which items are done (or why it refused the directory).
  done: set[str] = set()
  refusal = ""
  if index == 0:
    try:
      _check_run_identity(out_dir, json.loads(json.dumps(identity)))
      merge_parts(out_dir)
      done = set(read_predictions(pred_path, repair=True))
      unknown = sorted(done - set(ids))
      if unknown:
        raise PredictionsFileError(f"{pred_path} holds {len(unknown)} ids that are not in this benchmark "
                                   f"(e.g. {unknown[:3]}); use another --out")
    except PredictionsFileError as e:
      refusal = str(e)
  if count > 1:
    refusal = distributed.broadcast_text(f"{exchange}/refusal", refusal)
  if refusal:
    raise PredictionsFileError(refusal if index == 0 else f"process 0 refused {out_dir}: {refusal}")
  if count > 1:
    done = set(json.loads(distributed.broadcast_text(f"{exchange}/done", json.dumps(sorted(done)))))
    seen = distributed.gather_text(f"{exchange}/seen", str(int(os.path.isfile(os.path.join(out_dir, RUN_FILE)))))
    if "0" in seen:
      raise PredictionsFileError(
          f"processes {[i for i, v in enumerate(seen) if v == '0']} do not see {out_dir}/{RUN_FILE}, which process "
          "0 wrote: a multi-process evaluation needs its output folder on storage every process sees")

  todo = [it for it in items if it.id not in done]
  mine = todo[index::count]
  missing = [it for it in mine if not os.path.isfile(it.video_path)]
  present = [it for it in mine if os.path.isfile(it.video_path)]
  if done and index == 0:
    log.info("resuming: %d of %d items already in %s", len(done), len(items), pred_path)
  if count > 1:
    log.info("process %d of %d: %d of the %d items to do", index, count, len(mine), len(todo))
  if missing:
    log.warning("%d video(s) not found, e.g. %s; they are counted and listed in the report",
                len(missing), missing[0].video_path)

  out_path = pred_path if count == 1 else os.path.join(out_dir, PART_FILE.format(index=index, count=count))
  generated, gen_seconds = 0, 0.0
  total, initial = (len(items), len(done)) if count == 1 else (len(mine), 0)
  with open(out_path, "a", encoding="utf-8") as out, \
      tqdm(total=total, initial=initial, unit="item", desc=benchmark, disable=not progress) as bar:

    def write(rec: metrics_lib.PredictionRecord) -> None:
      out.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
      out.flush()  # a crash loses at most the batch in flight
      bar.update(1)

    for it in missing:
      write(_record(it, metrics_lib.STATUS_MISSING, error=f"video not found: {it.video_path}"))
    for start in range(0, len(present), batch_size):
      batch = present[start:start + batch_size]
      t0 = time.perf_counter()
      results = _generate(batch, generate_fn, item_errors)
      gen_seconds += time.perf_counter() - t0
      for it, res in zip(batch, results):
        if res.error is not None:
          write(_record(it, metrics_lib.STATUS_VIDEO_ERROR, error=res.error))
        else:
          write(_record(it, metrics_lib.STATUS_OK, res))
          generated += 1

  if count > 1:  # waits for every process's share; the processes generated side by side
    shares = [json.loads(t) for t in distributed.gather_text(
        f"{exchange}/finished", json.dumps([generated, gen_seconds]), timeout_s=FINISH_TIMEOUT_S)]
    generated, gen_seconds = sum(g for g, _ in shares), max(s for _, s in shares)
  summary = None
  if index == 0:
    merge_parts(out_dir)
    # The file, not this process's memory, is the result: a resumed run scores exactly the same records.
    records = read_predictions(pred_path)
    summary = {
        "run": {**identity, "out_dir": out_dir, "generated_this_run": generated,
                "generation_seconds": round(gen_seconds, 3),
                "items_per_s": generated / gen_seconds if generated and gen_seconds > 0 else None},
        "metrics": metrics_lib.compute_metrics([records[i] for i in ids]),
    }
    if count > 1:
      summary["run"]["processes"] = count
    with open(os.path.join(out_dir, report_lib.METRICS_FILE), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
    report_lib.write_run_report(summary, out_dir)
  if count > 1:
    summary = json.loads(distributed.broadcast_text(f"{exchange}/summary", json.dumps(summary)))
  return summary
