"""Readable reports: one run's `report.md` + plots, and a comparison of several runs.

    python -m vt_jax.eval.report RUN_DIR [RUN_DIR ...] [--out DIR]

reads each run's `metrics.json` (written by `vt_jax.eval.runner.run_eval`) and writes `comparison.md`
(one row per run, the paper's number beside ours) and `accuracy_vs_frames.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or TPU hosts
import matplotlib.pyplot as plt  # noqa: E402

from vt_jax.eval import published  # noqa: E402
from vt_jax.eval.benchmarks import VIDEO_HOLMES_TYPES  # noqa: E402

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
CATEGORY_PLOT = "per_category_accuracy.png"
FRAMES_PLOT = "accuracy_vs_frames.png"
COMPARISON_FILE = "comparison.md"


def _f(x: float | None, digits: int = 2) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def _title(benchmark: str) -> str:
  return published.BENCHMARK_TITLES.get(benchmark, benchmark)


def ordered_categories(benchmark: str, names: Sequence[str]) -> list[str]:
  """Categories in the benchmark's canonical table order (Video-Holmes: SR ... CTI), others sorted."""
  canon = VIDEO_HOLMES_TYPES if benchmark == "video_holmes" else ()
  return [c for c in canon if c in names] + sorted(c for c in names if c not in canon)


# ----------------------------------------------------------------------------------------------------
# Plots.


def plot_category_accuracy(summary: dict[str, Any], path: str) -> str:
  """Horizontal bars: accuracy (correct / evaluated) per category, with the overall line."""
  run, metrics = summary["run"], summary["metrics"]
  cats = ordered_categories(run["benchmark"], list(metrics["per_category"]))
  raw = [metrics["per_category"][c]["accuracy"] for c in cats]  # None: nothing evaluated there
  accs = [a or 0.0 for a in raw]
  counts = [metrics["per_category"][c]["n_evaluated"] for c in cats]
  fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(cats), 2) + 1.4))
  y = range(len(cats))
  ax.barh(list(y), accs, color="#4c72b0")
  ax.set_yticks(list(y), [f"{c} (n={n})" for c, n in zip(cats, counts)])
  ax.invert_yaxis()
  if metrics["accuracy"] is not None:
    ax.axvline(metrics["accuracy"], color="#c44e52", linestyle="--",
               label=f"overall {metrics['accuracy']:.1f}%")
    ax.legend(loc="lower right", fontsize=8)
  for yi, a in zip(y, raw):
    ax.text((a or 0.0) + 1, yi, "n/a" if a is None else f"{a:.1f}", va="center", fontsize=8)
  ax.set_xlim(0, 110)  # room for the value labels
  ax.set_xlabel("accuracy (%)")
  ax.set_title(f"{_title(run['benchmark'])}, {run.get('nframes', '?')} frames, {run.get('model', '')}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_accuracy_vs_frames(summaries: Sequence[dict[str, Any]], path: str) -> str:
  """One line per (benchmark, model): accuracy against frame count; the paper's points as crosses."""
  series: dict[tuple[str, str], list[tuple[int, float]]] = {}
  for s in summaries:
    run = s["run"]
    key = (run["benchmark"], run.get("model", "?"))
    if s["metrics"]["accuracy"] is not None:
      series.setdefault(key, []).append((int(run["nframes"]), s["metrics"]["accuracy"]))
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for (bench, model), points in sorted(series.items()):
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{_title(bench)}: {model}")
  frames = {p[0] for pts in series.values() for p in pts}
  for bench in sorted({k[0] for k in series}):
    paper = [r for n in (16, 32, 64) for r in published.published_accuracy(bench, n)
             if r.model == "Video-Thinker-7B"]
    frames |= {r.nframes for r in paper}
    if paper:
      ax.plot([r.nframes for r in paper], [r.accuracy for r in paper], linestyle=":", marker="x",
              color="gray", label=f"{_title(bench)}: Video-Thinker-7B (paper)")
  frames = sorted(frames)
  ax.set_xscale("log", base=2)
  ax.set_xticks(frames, [str(f) for f in frames])
  ax.set_xlabel("frames per video")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("accuracy vs frames")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------------------------------
# One run.


def render_run_report(summary: dict[str, Any]) -> str:
  """The Markdown report of one run: our numbers beside the paper's for the same benchmark and frames."""
  run, m = summary["run"], summary["metrics"]
  bench, nframes, model = run["benchmark"], int(run.get("nframes", 16)), run.get("model", "?")
  lines = [f"# {_title(bench)}: {model}, {nframes} frames", ""]
  lines += [f"Items: {m['n_items']} · evaluated: {m['n_evaluated']} · missing videos: "
            f"{m['n_missing_video']} · unreadable videos: {m['n_video_error']}", ""]
  if run.get("options"):
    lines += ["Options: " + ", ".join(f"`{k}={v}`" for k, v in sorted(run["options"].items())), ""]

  lines += ["## Accuracy", "", "| | accuracy (%) |", "|---|---|",
            f"| ours: correct / evaluated ({m['n_correct']}/{m['n_evaluated']}) | {_f(m['accuracy'])} |",
            f"| ours: over all {m['n_items']} items, missing or unreadable = wrong | "
            f"{_f(m['accuracy_all_items'])} |"]
  for r in published.published_accuracy(bench, nframes):
    lines.append(f"| {r.model} (paper) | {_f(r.accuracy)} |")
  if not published.published_accuracy(bench, nframes):
    lines.append(f"| (the paper reports no {nframes}-frame number for this benchmark) | |")
  if bench in published.COMPARABILITY:
    lines += ["", f"Comparability: {published.COMPARABILITY[bench]}"]

  lines += ["", "## Per category", "",
            "| category | items | evaluated | correct | accuracy (%) | over all items (%) |",
            "|---|---|---|---|---|---|"]
  for c in ordered_categories(bench, list(m["per_category"])):
    pc = m["per_category"][c]
    lines.append(f"| {c} | {pc['n_items']} | {pc['n_evaluated']} | {pc['n_correct']} | "
                 f"{_f(pc['accuracy'])} | {_f(pc['accuracy_all_items'])} |")
  if os.path.basename(run.get("category_plot", "")):
    lines += ["", f"![per-category accuracy]({os.path.basename(run['category_plot'])})"]

  lines += ["", "## Output", "", "| | value |", "|---|---|",
            f"| answer parsed (%) | {_f(m['answer_parse_rate'])} |",
            f"| format-following rate (%) | {_f(m['format_rate'])} |",
            f"| mean output length ({m['length_unit']}) | {_f(m['mean_output_length'], 1)} |"]
  if run.get("items_per_s") is not None:
    lines.append(f"| throughput (items/s, this invocation) | {_f(run['items_per_s'], 3)} |")

  g = m.get("grounding")
  if g:
    lines += ["", "## Grounding", "",
              f"For each ground-truth span, the best IoU over the predicted `<time>` windows "
              f"({g['n_spans']} spans in {g['n_items']} items).", "",
              "| | mIoU | R@0.3 | R@0.5 |", "|---|---|---|---|",
              f"| ours | {_f(g['miou'])} | {_f(g['r@0.3'])} | {_f(g['r@0.5'])} |"]
    for model_name, p in published.published_grounding().items():
      lines.append(f"| {model_name} (paper, in-domain caption test) | {_f(p['miou'])} | "
                   f"{_f(p['r@0.3'])} | {_f(p['r@0.5'])} |")
  c = m.get("captions")
  if c:
    lines += ["", "## Captions", "",
              f"{c['n_pairs']} caption pairs from {c['n_items']} items. METEOR here matches exact words "
              "and Porter stems (no WordNet synonyms), so it is not the COCO toolkit's METEOR 1.5.", "",
              "| ROUGE-L | BLEU-1 | METEOR |", "|---|---|---|",
              f"| {_f(c['rouge_l'])} | {_f(c['bleu_1'])} | {_f(c['meteor'])} |"]

  missing = m["not_evaluated"]
  lines += ["", f"## Not evaluated ({len(missing)})", ""]
  if missing:
    lines += ["| id | status | video | error |", "|---|---|---|---|"]
    for r in missing:
      err = (r.get("error") or "").replace("|", "\\|").replace("\n", " ")
      lines.append(f"| {r['id']} | {r['status']} | `{r['video_path']}` | {err} |")
  else:
    lines.append("Every item's video was found and decoded.")
  return "\n".join(lines) + "\n"


def write_run_report(summary: dict[str, Any], out_dir: str) -> dict[str, str]:
  """Writes `report.md` and `per_category_accuracy.png` into out_dir; returns their paths."""
  plot = plot_category_accuracy(summary, os.path.join(out_dir, CATEGORY_PLOT))
  summary = {**summary, "run": {**summary["run"], "category_plot": plot}}
  report = os.path.join(out_dir, REPORT_FILE)
  with open(report, "w", encoding="utf-8") as f:
    f.write(render_run_report(summary))
  return {"report": report, "category_plot": plot}


# ----------------------------------------------------------------------------------------------------
# Several runs.


def load_summary(run_dir: str) -> dict[str, Any]:
  path = os.path.join(run_dir, METRICS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read run metrics ({e}); is {run_dir!r} an eval output dir?") from e
  for key in ("run", "metrics"):
    if key not in summary:
      raise ValueError(f"{path}: missing {key!r}; not written by vt_jax.eval.runner")
  return summary


def render_comparison(run_dirs: Sequence[str], summaries: Sequence[dict[str, Any]]) -> str:
  lines = ["# Run comparison", "",
           "| run | benchmark | model | frames | items | evaluated | missing/unreadable | accuracy (%) | "
           "all items (%) | Video-Thinker-7B paper (%) | format (%) | mean length | mIoU |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for d, s in zip(run_dirs, summaries):
    run, m = s["run"], s["metrics"]
    paper = [r.accuracy for r in published.published_accuracy(run["benchmark"], int(run["nframes"]))
             if r.model == "Video-Thinker-7B"]
    g = m.get("grounding")
    lines.append(
        f"| {d} | {_title(run['benchmark'])} | {run.get('model', '?')} | {run['nframes']} | {m['n_items']} | "
        f"{m['n_evaluated']} | {m['n_missing_video'] + m['n_video_error']} | {_f(m['accuracy'])} | "
        f"{_f(m['accuracy_all_items'])} | {_f(paper[0]) if paper else '-'} | {_f(m['format_rate'])} | "
        f"{_f(m['mean_output_length'], 1)} {m['length_unit']} | {_f(g['miou']) if g else '-'} |")
  return "\n".join(lines) + f"\n\n![accuracy vs frames]({FRAMES_PLOT})\n"


def compare_runs(run_dirs: Sequence[str], out_dir: str) -> dict[str, str]:
  """Writes `comparison.md` and `accuracy_vs_frames.png` for the given run dirs into out_dir."""
  summaries = [load_summary(d) for d in run_dirs]
  os.makedirs(out_dir, exist_ok=True)
  plot = plot_accuracy_vs_frames(summaries, os.path.join(out_dir, FRAMES_PLOT))
  path = os.path.join(out_dir, COMPARISON_FILE)
  with open(path, "w", encoding="utf-8") as f:
    f.write(render_comparison(run_dirs, summaries))
  return {"comparison": path, "frames_plot": plot}


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vt_jax.eval.report",
                                   description="Compare vt_jax.eval runs: a table and accuracy vs frames.")
  parser.add_argument("run_dirs", nargs="+", help="output dirs of vt_jax.eval runs (each has metrics.json)")
  parser.add_argument("--out", default="eval_comparison", help="where to write comparison.md and the plot")
  args = parser.parse_args(argv)
  try:
    paths = compare_runs(args.run_dirs, args.out)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  with open(paths["comparison"], encoding="utf-8") as f:
    print(f.read())
  print(f"wrote {paths['comparison']} and {paths['frames_plot']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
