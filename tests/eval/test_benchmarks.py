"""Benchmark adapters on fixture files written in each benchmark's published format."""
import json
import os

import pytest

from vt_jax.eval import benchmarks
from vt_jax.eval.benchmarks import BenchmarkFormatError, load_benchmark

FIX = os.path.join(os.path.dirname(__file__), "fixtures")


def _touch(root, rel):
  path = os.path.join(root, rel)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()
  return path


def test_registry_covers_the_issue():
  assert set(benchmarks.BENCHMARKS) >= {"video_holmes", "cg_bench", "vrbench", "star", "lvbench",
                                        "activitynet", "youcook2", "scalelong", "video_r1"}
  with pytest.raises(KeyError, match="unknown benchmark"):
    load_benchmark("mvbench", os.path.join(FIX, "eval_mvbench.json"), "/nowhere")


def test_video_holmes(tmp_path):
  # The zip's folder name is uncertain: a video under videos_cropped/ must still be found.
  found = _touch(tmp_path, "videos_cropped/kP0x-2_aZ9Q.mp4")
  items = load_benchmark("video_holmes", os.path.join(FIX, "test_Video-Holmes.json"), str(tmp_path))
  a, b = items
  assert a.id == "RSmjqss0XKQ_3" and b.id == "kP0x-2_aZ9Q_17"    # int and str Question IDs
  assert a.options[0] == "A. He was locked in by his partner." and a.options[-1].startswith("F. ")
  assert a.letters == "ABCDEF" and a.answer == "C" and a.category == "TCI" and a.categories == ["TCI"]
  assert a.video_path == os.path.join(str(tmp_path), "videos", "RSmjqss0XKQ.mp4")  # missing: implied path
  assert b.video_path == found
  assert b.question.startswith("Order these events:\n1.") and b.options[1] == "B. 3→1→2"
  assert b.gt_spans == [] and b.start is None


def test_cg_bench_subsets(tmp_path):
  ann = os.path.join(FIX, "cgbench_mini.json")
  _touch(tmp_path, "cg_videos_720p/BV1xx411c7mD.mp4")
  items = load_benchmark("cg_bench", ann, str(tmp_path))                   # default: the Cognition filter
  assert [i.id for i in items] == ["2051", "2052"]
  a, b = items
  assert a.options[1] == "B. To steam the dumplings" and a.answer == "B"
  assert a.gt_spans == [(20.24, 169.88), (300.0, 312.5)] and a.category == "Event Cognition"
  assert os.path.isfile(a.video_path)
  assert b.answer == "B" and b.letters == "ABCDEFGH"                       # no right_answer: from text
  assert [i.id for i in load_benchmark("cg_bench", ann, str(tmp_path), subset="all")] == \
      ["14", "2051", "2052", "3001"]
  assert [i.id for i in load_benchmark("cg_bench", ann, str(tmp_path), subset="perception")] == ["14"]
  assert [i.id for i in load_benchmark("cg_bench", ann, str(tmp_path),
                                       sub_categories=["Hallucination", "Time Cognition"])] == ["2052", "3001"]
  entity = load_benchmark("cg_bench", ann, str(tmp_path), subset="perception")[0]
  assert entity.answer == "E" and entity.gt_spans == [(8.0, 11.0)] and len(entity.options) == 7
  with pytest.raises(ValueError, match="subset"):
    load_benchmark("cg_bench", ann, str(tmp_path), subset="reasoning")


def test_vrbench(tmp_path):
  # The released archive layout differs from video_path: found by basename.
  found = _touch(tmp_path, "v001_360p_zips/videos/v001_360p/TZk_p-q8Fzo.mp4")
  items = load_benchmark("vrbench", os.path.join(FIX, "VRBench_eval.jsonl"), str(tmp_path))
  assert [i.id for i in items] == ["TZk_p-q8Fzo_qa1", "TZk_p-q8Fzo_qa2", "TZk_p-q8Fzo_qa10", "Q9xY0pL2mN4_qa1"]
  qa1, qa2, qa10, other = items
  assert qa1.video_path == found and qa10.video_path == found
  assert qa1.gt_spans == [(464.0, 508.0), (3723.0, 3750.0)]                   # [HH:MM:SS->HH:MM:SS]
  assert qa1.answer == "D" and qa1.options == ["A. To film a show", "B. To escape a storm", "C. To meet a guide",
                                               "D. To find a lost map"]
  assert qa2.answer == "B" and qa2.gt_spans == []                            # lower-case letter accepted
  assert qa10.category == "Counting Porblems"                                # sic, as released
  assert qa1.raw["video"]["video_summary"].startswith("The team")           # kept for prompt variants
  assert other.video_path == os.path.join(str(tmp_path), "VRBench/videos/v001/Q9xY0pL2mN4.mp4")


def test_star(tmp_path):
  items = load_benchmark("star", os.path.join(FIX, "STAR_val.json"), str(tmp_path))
  a, b = items
  assert a.id == "Interaction_T1_13" and a.category == "Interaction" and b.category == "Sequence"
  assert a.answer == "C" and a.options[2] == "C. The clothes."              # letter from the answer TEXT
  assert b.answer == "B"                                                     # trailing space in the answer
  assert (a.start, a.end) == (11.1, 19.6) and (b.start, b.end) == (3.0, 12.25)
  assert a.video_path == os.path.join(str(tmp_path), "Charades_v1_480", "6H78U.mp4")


def test_lvbench(tmp_path):
  found = _touch(tmp_path, "Cm73ma6Ibcs.mp4")
  items = load_benchmark("lvbench", os.path.join(FIX, "video_info.meta.jsonl"), str(tmp_path))
  a, b, c = items
  assert [i.id for i in items] == ["55", "56", "900"]                      # str(uid), int or str
  assert a.question == "What year appears in the opening caption of the video?"
  assert a.options == ["A. 1636", "B. 1366", "C. 1363", "D. 1633"] and a.answer == "D"
  assert a.gt_spans == [(15.0, 19.0)] and a.video_path == found
  assert b.answer == "A"                                                     # lower-case 'a'
  assert b.category == ["reasoning", "event understanding"]                 # multi-label
  assert b.gt_spans == [(3723.0, 3760.0)]                                    # HH:MM:SS-HH:MM:SS
  assert c.gt_spans == [] and c.categories == ["event understanding"]


def test_video_r1_paths_and_types(tmp_path):
  # The official script doubles "Evaluation": a root holding MVBench/ directly must work.
  found = _touch(tmp_path, "MVBench/star/Charades_v1_480/ABC12.mp4")
  items = load_benchmark("video_r1", os.path.join(FIX, "eval_mvbench.json"), str(tmp_path))
  assert [i.id for i in items] == ["125739", "125741"]                      # the numerical item is skipped
  a, b = items
  assert a.video_path == found and a.answer == "B" and a.options[1] == "B. Typing on it"
  assert a.category == "MVBench" and b.answer == "C" and b.letters == "ABC"
  assert b.video_path == os.path.join(str(tmp_path), "Evaluation/MVBench/clevrer/video_0042.mp4")
  # With the "Evaluation/" layout kept, the full relative path is found first.
  kept = _touch(tmp_path / "r2", "Evaluation/MVBench/clevrer/video_0042.mp4")
  assert load_benchmark("video_r1", os.path.join(FIX, "eval_mvbench.json"), str(tmp_path / "r2"))[1].video_path \
      == kept


def test_in_domain_video_thinker_json(tmp_path):
  ann = os.path.join(FIX, "activitynet_test.jsonl")
  root = tmp_path / "anet"
  found = _touch(root, "activitynet/v_abc123.mp4")
  items = load_benchmark("activitynet", ann, "/unused", video_roots={"activitynet": str(root)},
                         gt_from_process=True)
  a, b = items
  assert a.benchmark == "activitynet" and a.video_path == found and a.category == "activitynet"
  assert a.gt_spans == [(5.0, 12.0), (12.0, 20.0)]
  assert a.reference_captions == ["A man kneels and ties his shoes on a track.",
                                  "He stands up and starts jogging along the track."]
  assert b.gt_spans == [(0.0, 4.0), (4.0, 6.5)] and b.reference_captions[1] == "Someone cuts the cake."
  plain = load_benchmark("youcook2", ann, str(root))
  assert plain[0].gt_spans == [] and plain[0].benchmark == "youcook2"


def _write(tmp_path, name, records, jsonl=False):
  path = tmp_path / name
  with open(path, "w") as f:
    if jsonl:
      f.write("\n".join(json.dumps(r) for r in records) + "\n")
    else:
      json.dump(records, f)
  return str(path)


def _holmes(**overrides):
  rec = {"video ID": "v1", "Question ID": 1, "Question Type": "SR", "Question": "Who?",
         "Options": {"A": "x", "B": "y"}, "Answer": "A"}
  rec.update(overrides)
  return rec


@pytest.mark.parametrize("name,records,jsonl,index,field,reason", [
    ("video_holmes", [_holmes(), _holmes(**{"Question ID": 2, "Answer": "C"})], False, 1, "Answer", "expected one of"),
    ("video_holmes", [_holmes(Options={"A": "x", "C": "y"})], False, 0, "Options", "consecutive letters"),
    ("video_holmes", [{k: v for k, v in _holmes().items() if k != "video ID"}], False, 0, "video ID", "missing"),
    ("star", [{"question_id": "Interaction_T1_1", "question": "q", "video_id": "v", "start": 1, "end": 2,
               "answer": "The cup.", "choices": [{"choice_id": 0, "choice": "The bag."},
                                                 {"choice_id": 1, "choice": "The box."}]}],
     False, 0, "answer", "matches 0 of the options"),
    ("lvbench", [{"key": "k", "qa": [{"uid": 1, "question": "q\n(A) a\n(C) c", "answer": "A",
                                      "question_type": ["reasoning"], "time_reference": ""}]}],
     True, 0, "qa[0].question", "inline options"),
    ("lvbench", [{"key": "k", "qa": [{"uid": 1, "question": "q\n(A) a\n(B) b", "answer": "A",
                                      "question_type": ["reasoning"], "time_reference": "later"}]}],
     True, 0, "qa[0].time_reference", "MM:SS"),
    ("cg_bench", [{"qid": 1, "video_uid": "u", "question": "q", "choices": ["a", "b"], "right_answer": "A",
                   "clue_intervals": [[5, 2]], "sub_category": "Event Cognition"}],
     False, 0, "clue_intervals[0]", "start <= end"),
    ("vrbench", [{"video_id": "v", "video_path": "v.mp4",
                  "mcq": {"qa1": {"question": "q", "options": {"A": "a", "B": "b"}, "answer": "A"}}}],
     True, 0, "mcq.qa1.reasoning_type", "missing"),
    ("video_r1", [{"problem": "q", "options": ["A. a", "C. c"], "solution": "<answer>A</answer>",
                   "path": "x.mp4"}], False, 0, "options[1]", "starting 'B. '"),
    ("video_r1", [{"problem": "q", "options": ["A. a", "B. b"], "solution": "A", "path": "x.mp4"}],
     False, 0, "solution", "<answer>X</answer>"),
])
def test_bad_records_name_file_index_field(tmp_path, name, records, jsonl, index, field, reason):
  path = _write(tmp_path, "ann.jsonl" if jsonl else "ann.json", records, jsonl)
  with pytest.raises(BenchmarkFormatError) as info:
    load_benchmark(name, path, str(tmp_path))
  err = info.value
  assert (err.path, err.index, err.field) == (path, index, field)
  assert reason in str(err) and path in str(err) and f"record {index}" in str(err)


def test_unreadable_files_and_duplicate_ids(tmp_path):
  with pytest.raises(BenchmarkFormatError, match="cannot read"):
    load_benchmark("star", str(tmp_path / "nope.json"), str(tmp_path))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"key": "k", "qa": []}\n{"key": \n')
  with pytest.raises(BenchmarkFormatError, match="line 2 is not valid JSON"):
    load_benchmark("lvbench", str(bad), str(tmp_path))
  dup = _write(tmp_path, "dup.json", [_holmes(), _holmes()])
  with pytest.raises(BenchmarkFormatError, match="duplicate item id 'v1_1'"):
    load_benchmark("video_holmes", dup, str(tmp_path))


def test_synthetic_dataset_format(tmp_path):
  found = _touch(tmp_path, "videos/test_00000.mp4")
  [item] = load_benchmark("synthetic", os.path.join(FIX, "synthetic_test.json"), str(tmp_path))
  assert item.benchmark == "synthetic" and item.id == "256" and item.video_path == found
  assert item.category == "direction" and item.answer == "D"
  assert item.gt_spans == [(3.0, 9.0)]                                     # from `segments`
  assert item.reference_captions == ["A blue triangle moves to the right."]  # from the reference trace
  bad = _write(tmp_path, "bad.json", [{"problem": "q", "options": ["A. a", "B. b"], "path": "v.mp4",
                                       "solution": "<answer>A</answer>", "segments": [[3, 9], [9, 2]]}])
  with pytest.raises(BenchmarkFormatError, match=r"record 0, field 'segments\[1\]'"):
    load_benchmark("synthetic", bad, str(tmp_path))


def test_resolver_never_guesses_between_same_named_files(tmp_path):
  a = _touch(tmp_path, "part1/Cm73ma6Ibcs.mp4")
  resolver = benchmarks.VideoResolver(str(tmp_path))
  assert resolver.resolve(["Cm73ma6Ibcs.mp4"]) == a                             # unique: found by basename
  _touch(tmp_path, "part2/Cm73ma6Ibcs.mp4")
  resolver = benchmarks.VideoResolver(str(tmp_path))
  assert resolver.resolve(["Cm73ma6Ibcs.mp4"]) == os.path.join(str(tmp_path), "Cm73ma6Ibcs.mp4")  # ambiguous
  assert benchmarks.VideoResolver(str(tmp_path), search_by_basename=False).resolve(["x/Cm73ma6Ibcs.mp4"]) == \
      os.path.join(str(tmp_path), "x/Cm73ma6Ibcs.mp4")
