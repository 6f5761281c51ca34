"""Record reading and validation: JSON and JSONL, video roots, one error per bad-field case."""
import json

import pytest

from vt_jax.data import records as R

GOOD = {
    "problem_id": 7, "problem": "What appeared right after the red square left?",
    "options": ["A. a blue circle", "B. a green star", "C. nothing", "D. a red circle"],
    "solution": "<answer>B</answer>",
    "process": "<time>00:03-00:06</time> <caption>The red square leaves.</caption> "
               "<think>Next is what matters.</think> <time>00:06-00:09</time> <caption>A green star "
               "appears.</caption> <think>So the star.</think>",
    "path": "train/v7.mp4", "data_source": "synthetic", "problem_type": "multiple choice",
    "data_type": "video",
}


def write(tmp_path, records, name="data.json", jsonl=False):
  path = tmp_path / name
  if jsonl:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  else:
    path.write_text(json.dumps(records))
  return str(path)


@pytest.mark.parametrize("jsonl", [False, True])
def test_read_json_and_jsonl(tmp_path, jsonl):
  other = dict(GOOD, path="/abs/v.mp4", data_source="anet", process=GOOD["process"] + " <answer>B</answer>")
  file = write(tmp_path, [GOOD, other], "d.jsonl" if jsonl else "d.json", jsonl)
  recs = R.read_records(file, video_roots={"synthetic": "/data/syn", "*": "/data/other"},
                        require_trace=True)
  assert [r.index for r in recs] == [0, 1] and recs[0].source_file == file
  assert recs[0].video_path == "/data/syn/train/v7.mp4" and recs[1].video_path == "/abs/v.mp4"
  assert recs[0].answer == "B" and recs[0].options == tuple(GOOD["options"])
  # The trace without an answer gets the solution appended; one with it is kept as is.
  assert recs[0].completion == GOOD["process"] + "\n<answer>B</answer>"
  assert recs[1].completion == other["process"]
  assert R.read_records(file)[0].video_path is None  # no root map: paths left unresolved
  assert recs[0].to_json()["problem_id"] == 7


def test_video_roots_parsing_and_default():
  roots = R.parse_video_roots(["activitynet=/d/anet", "/d/all"])
  assert roots == {"activitynet": "/d/anet", "*": "/d/all"}
  assert R.resolve_video_path("a/b.mp4", "star", roots) == "/d/all/a/b.mp4"
  assert R.resolve_video_path("./x.mp4", "activitynet", roots) == "/d/anet/x.mp4"


def test_data_type_filter_and_other_problem_types(tmp_path):
  num = {"problem": "How many?", "solution": "<answer>3</answer>", "path": "i.jpg",
         "problem_type": "numerical", "data_type": "image", "data_source": "x"}
  file = write(tmp_path, [GOOD, num])
  assert len(R.read_records(file, data_types=["video"])) == 1
  both = R.read_records(file)  # nothing is dropped unless asked
  assert both[1].answer == "3" and both[1].options == () and both[1].completion is None


BAD_CASES = [
    ("missing problem", lambda r: r.pop("problem"), "problem", "missing"),
    ("empty problem", lambda r: r.update(problem="  "), "problem", "empty"),
    ("problem not str", lambda r: r.update(problem=3), "problem", "must be a string"),
    ("missing path", lambda r: r.pop("path"), "path", "missing"),
    ("missing solution", lambda r: r.pop("solution"), "solution", "missing"),
    ("no answer tag", lambda r: r.update(solution="B"), "solution", "exactly one"),
    ("two answers", lambda r: r.update(solution="<answer>A</answer><answer>B</answer>"), "solution",
     "exactly one"),
    ("letter not among options", lambda r: r.update(solution="<answer>E</answer>"), "solution",
     "not among the options"),
    ("not a letter", lambda r: r.update(solution="<answer>blue</answer>"), "solution", "no option letter"),
    ("missing options", lambda r: r.pop("options"), "options", "missing"),
    ("one option", lambda r: r.update(options=["A. x"]), "options", "at least 2"),
    ("empty option", lambda r: r.update(options=["A. x", " "]), "options", "option 1"),
    ("repeated letters", lambda r: r.update(options=["A. x", "A. y"]), "options", "repeated"),
    ("missing trace", lambda r: r.pop("process"), "process", "missing"),
    ("empty trace", lambda r: r.update(process="   "), "process", "empty"),
    ("trace answers otherwise", lambda r: r.update(process=GOOD["process"] + "<answer>A</answer>"),
     "process", "the trace answers 'A'"),
    ("broken triplets", lambda r: r.update(process="<time>00:01</time> nothing"), "process",
     "well-formed"),
    ("unknown problem type", lambda r: r.update(problem_type="essay"), "problem_type", "not one of"),
    ("bad data type", lambda r: r.update(data_type="audio"), "data_type", "neither"),
    ("unmapped source", lambda r: r.update(data_source="youcook2"), "data_source", "no video root"),
]


@pytest.mark.parametrize("name,mutate,field,message", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_records_name_file_index_and_field(tmp_path, name, mutate, field, message):
  bad = json.loads(json.dumps(GOOD))
  mutate(bad)
  file = write(tmp_path, [GOOD, GOOD, bad])
  with pytest.raises(R.RecordError, match=message) as err:
    R.read_records(file, video_roots={"synthetic": "/v"}, require_trace=True)
  assert (err.value.file, err.value.index, err.value.field) == (file, 2, field)
  assert f"{file}, record 2, field {field!r}" in str(err.value)


def test_bad_files(tmp_path):
  with pytest.raises(R.RecordError, match="file not found"):
    R.read_records(tmp_path / "nope.json")
  (tmp_path / "a.json").write_text("[{")
  with pytest.raises(R.RecordError, match="invalid JSON"):
    R.read_records(tmp_path / "a.json")
  (tmp_path / "b.jsonl").write_text(json.dumps(GOOD) + "\n{oops\n")
  with pytest.raises(R.RecordError, match="line 2") as err:
    R.read_records(tmp_path / "b.jsonl")
  assert err.value.index == 1
  (tmp_path / "c.json").write_text("[3]")
  with pytest.raises(R.RecordError, match="JSON object") as err:
    R.read_records(tmp_path / "c.json")
  assert err.value.index == 0
  # Without require_trace, GRPO/eval data may lack the trace.
  no_trace = dict(GOOD)
  del no_trace["process"]
  assert R.read_records(write(tmp_path, [no_trace]))[0].process is None
