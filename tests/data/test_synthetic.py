"""The synthetic Video-Thinker-format dataset: determinism, answers vs the event script, balanced
letters, well-formed traces, videos that show the script, and the tokenizer."""

import collections
import json
import os
import re

import numpy as np
import pytest

from vt_jax.data import synth_tokenizer, synthetic
from vt_jax.data import video as V

N_TRAIN, N_TEST = 24, 8
FIELDS = {"problem": str, "options": list, "solution": str, "process": str, "path": str,
          "data_source": str, "problem_type": str, "data_type": str, "problem_id": int,
          "segments": list}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth")
  paths = synthetic.generate_dataset(root, N_TRAIN, N_TEST, seed=3)
  train = json.load(open(paths.train_json))
  test = json.load(open(paths.test_json))
  return paths, train, test


def test_records_have_video_thinker_fields(dataset):
  paths, train, test = dataset
  assert len(train) == N_TRAIN and len(test) == N_TEST
  for r in train + test:
    for field, kind in FIELDS.items():
      assert isinstance(r[field], kind), field
    assert r["data_source"] == "synthetic" and r["data_type"] == "video"
    assert r["problem_type"] == "multiple choice"
    assert [o[:3] for o in r["options"]] == ["A. ", "B. ", "C. ", "D. "]
    assert len(set(r["options"])) == 4 and len({o[3:] for o in r["options"]}) == 4
    assert [o[3:] for o in r["options"]] == list(synthetic.OPTIONS[r["question_type"]])  # fixed order
    assert re.fullmatch(r"<answer>[ABCD]</answer>", r["solution"])
    assert not os.path.isabs(r["path"]) and os.path.isfile(os.path.join(paths.root, r["path"]))
  assert {r["problem_id"] for r in train}.isdisjoint({r["problem_id"] for r in test})
  assert {r["path"] for r in train}.isdisjoint({r["path"] for r in test})


def independent_answer(r):
  """Re-derive the answer text from the event script, without synthetic.answer_from_events."""
  ev = sorted(r["events"], key=lambda e: e["start"])
  qtype = r["question_type"]
  if qtype == "only_colour":
    assert len(ev) == 1
    return ev[0]["colour"]
  if qtype == "missing_colour":
    (c,) = {"red", "green", "blue", "yellow"} - {e["colour"] for e in ev}
    return c
  if qtype == "first_colour":
    return ev[0]["colour"]
  if qtype == "last_colour":
    return ev[-1]["colour"]
  if qtype == "colour_change":
    (e,) = [e for e in ev if e["new_colour"] is not None]
    assert e["new_colour"] != e["colour"]
    return e["new_colour"]
  assert qtype == "direction", qtype
  (e,) = [e for e in ev if f'the {e["colour"]} object' in r["problem"]]
  return e["direction"]


def test_script_invariants(dataset):
  _, train, test = dataset
  for r in train + test:
    ev = r["events"]
    lo, hi = synthetic.NUM_OBJECTS[r["question_type"]]
    assert lo <= len(ev) <= hi
    assert len({e["colour"] for e in ev}) == len(ev)  # a colour names one object
    changes = [e for e in ev if e["change_at"] is not None]
    assert len(changes) == (r["question_type"] == "colour_change")
    for e in changes:
      assert e["start"] + 2 <= e["change_at"] <= e["end"] - 2
    for a, b in zip(ev, ev[1:]):
      assert a["end"] + synthetic.MIN_GAP <= b["start"]


def test_answers_follow_from_the_event_script(dataset):
  _, train, test = dataset
  for r in train + test:
    letter = r["solution"][8]
    texts = {o[0]: o[3:] for o in r["options"]}
    assert texts[letter] == independent_answer(r), r["problem_id"]
    assert synthetic.answer_from_events(r) == letter
    # Exactly one option is correct: the answer text occurs once.
    assert list(texts.values()).count(texts[letter]) == 1


def test_letters_and_question_types_are_balanced(dataset):
  _, train, _ = dataset
  letters = collections.Counter(r["solution"][8] for r in train)
  assert set(letters) == set("ABCD") and max(letters.values()) - min(letters.values()) <= 1
  qtypes = collections.Counter(r["question_type"] for r in train)
  assert set(qtypes) == set(synthetic.QUESTION_TYPES)
  assert max(qtypes.values()) - min(qtypes.values()) <= 1


TRIPLET = re.compile(r"<time>(\d{2}):(\d{2})-(\d{2}):(\d{2})</time> <caption>[^<]+</caption> "
                     r"<think>[^<]+</think>")


def test_traces_are_well_formed(dataset):
  _, train, test = dataset
  for r in train + test:
    p = r["process"]
    assert p.count("<answer>") == p.count("</answer>") == 1
    assert p.endswith(r["solution"])  # nothing after the answer
    n = p.count("<time>")
    assert n == {"colour_change": 2, "missing_colour": 3}.get(r["question_type"], 1)
    for tag in ("time", "caption", "think"):
      assert p.count(f"<{tag}>") == p.count(f"</{tag}>") == n
    windows = []
    for m in TRIPLET.finditer(p):
      a, b = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
      assert 0 <= a < b <= r["duration"]
      windows.append([a, b])
    assert len(windows) == n and windows == r["segments"]
    letter = r["solution"][8]
    answer = r["options"]["ABCD".index(letter)][3:]
    assert p.endswith(f"The answer is {answer}, option {letter}. <answer>{letter}</answer>")


def test_video_shows_the_script(dataset):
  paths, train, _ = dataset
  for r in train[:4]:
    v = V.load_video(os.path.join(paths.root, r["path"]), synthetic.SYNTH_SAMPLING,
                     keep_uint8=True)
    assert v.grid_thw.tolist() == [8, 8, 8]  # 16 frames at 112x112 -> 128 merged tokens
    assert v.total_frames == r["duration"] * r["fps"] and v.video_fps == r["fps"]
    events = [synthetic.Event(**e) for e in r["events"]]
    for frame, t in zip(v.frames_uint8, v.timestamps):
      drawn = synthetic.render_frame(events, t)
      assert np.abs(frame.astype(int) - drawn.astype(int)).mean() < 4.0  # mp4v is lossy
      visible = [e for e in events if e.start <= t < e.end]
      if visible:  # the object's colour is at its centre
        x, y = (int(round(c)) for c in synthetic._centre(visible[0], t))
        want = np.array(synthetic._RGB[visible[0].colour_at(t)])
        assert np.abs(frame[y, x].astype(int) - want).max() < 40


def test_deterministic_and_seed_dependent(tmp_path):
  a = synthetic.generate_dataset(tmp_path / "a", 6, 2, seed=11)
  b = synthetic.generate_dataset(tmp_path / "b", 6, 2, seed=11)
  c = synthetic.generate_dataset(tmp_path / "c", 6, 2, seed=12)
  for name in ("train.json", "test.json", "tokenizer/tokenizer.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  assert (tmp_path / "a/train.json").read_bytes() != (tmp_path / "c/train.json").read_bytes()
  for name in sorted(os.listdir(a.video_dir)):
    fa = V.decode_frames(os.path.join(a.video_dir, name), [0, 5, 20])
    fb = V.decode_frames(os.path.join(b.video_dir, name), [0, 5, 20])
    np.testing.assert_array_equal(fa, fb)


def test_ensure_dataset_is_idempotent(tmp_path):
  paths = synthetic.ensure_dataset(tmp_path, 4, 2, seed=0)
  stamp = os.stat(paths.train_json).st_mtime_ns
  again = synthetic.ensure_dataset(tmp_path, 4, 2, seed=0)
  assert again == paths and os.stat(paths.train_json).st_mtime_ns == stamp
  os.remove(os.path.join(paths.video_dir, "test_00001.mp4"))  # incomplete -> regenerate
  synthetic.ensure_dataset(tmp_path, 4, 2, seed=0)
  assert os.path.isfile(os.path.join(paths.video_dir, "test_00001.mp4"))
  synthetic.ensure_dataset(tmp_path, 5, 2, seed=0)  # other settings -> regenerate
  assert len(json.load(open(paths.train_json))) == 5
  assert json.load(open(paths.manifest))["num_train"] == 5
  synthetic.ensure_dataset(tmp_path, 5, 2, seed=0, question_types=("missing_colour",))  # other mix
  assert {r["question_type"] for r in json.load(open(paths.train_json))} == {"missing_colour"}
  with pytest.raises(ValueError, match="unknown"):
    synthetic.ensure_dataset(tmp_path, 5, 2, seed=0, question_types=("which_shape",))


def test_rl_split_is_held_out_and_leaves_the_other_splits_unchanged(tmp_path):
  """GRPO's prompt split: its own videos and ids; train, test and tokenizer byte-identical to a dataset
  without it; asking for another size (or none) regenerates."""
  plain = synthetic.ensure_dataset(tmp_path / "plain", 4, 2, seed=3)
  paths = synthetic.ensure_dataset(tmp_path / "rl", 4, 2, seed=3, num_rl=5)
  for name in ("train.json", "test.json", "tokenizer/tokenizer.json"):
    assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "rl" / name).read_bytes()
  assert not os.path.exists(plain.rl_json)
  rl = json.load(open(paths.rl_json))
  others = json.load(open(paths.train_json)) + json.load(open(paths.test_json))
  assert len(rl) == 5 and [r["problem_id"] for r in rl] == list(range(6, 11))
  assert all(r["path"].startswith("videos/rl_") and os.path.isfile(os.path.join(paths.root, r["path"]))
             for r in rl)
  assert {json.dumps(r["events"]) for r in rl}.isdisjoint({json.dumps(r["events"]) for r in others})
  assert json.load(open(paths.manifest))["num_rl"] == 5
  stamp = os.stat(paths.rl_json).st_mtime_ns
  assert synthetic.ensure_dataset(tmp_path / "rl", 4, 2, seed=3, num_rl=5) == paths
  assert os.stat(paths.rl_json).st_mtime_ns == stamp  # complete: not rewritten
  synthetic.ensure_dataset(tmp_path / "rl", 4, 2, seed=3)  # no rl split asked -> regenerated without it
  assert not os.path.exists(paths.rl_json) and "num_rl" not in json.load(open(paths.manifest))
  assert len(os.listdir(paths.video_dir)) == 6
  typed = synthetic.ensure_dataset(tmp_path / "rl", 4, 2, seed=3, num_rl=4, rl_question_types=("only_colour",))
  assert {r["question_type"] for r in json.load(open(typed.rl_json))} == {"only_colour"}
  assert json.load(open(typed.manifest))["rl_question_types"] == ["only_colour"]
  with pytest.raises(ValueError, match="unknown"):
    synthetic.ensure_dataset(tmp_path / "rl", 4, 2, seed=3, num_rl=4, rl_question_types=("which_shape",))


def test_cli(tmp_path, capsys):
  assert synthetic.main(["--out", str(tmp_path), "--num-train", "3", "--num-test", "1"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["train_json"] == str(tmp_path / "train.json")
  assert len(json.load(open(out["test_json"]))) == 1


def test_tokenizer_round_trips_and_keeps_specials_single(dataset):
  paths, train, _ = dataset
  tok = synth_tokenizer.load_tokenizer(paths.tokenizer_dir)
  ids = synth_tokenizer.special_token_ids(tok)
  assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
  assert 256 + 8 <= len(tok) <= 2048 and ids["vocab_size"] == len(tok)
  special_ids = [tok.convert_tokens_to_ids(t) for t in synth_tokenizer.QWEN_SPECIAL_TOKENS]
  assert len(set(special_ids)) == 8
  assert ids["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
  assert ids["eos_token_id"] == tok.eos_token_id
  chat = ("<|im_start|>user\n<|vision_start|>" + "<|video_pad|>" * 5 + "<|vision_end|>" +
          train[0]["problem"] + "<|im_end|>\n<|im_start|>assistant\n" + train[0]["process"] +
          "<|im_end|>")
  enc = tok(chat, add_special_tokens=False)["input_ids"]
  assert enc.count(ids["video_token_id"]) == 5
  for t, i in zip(synth_tokenizer.QWEN_SPECIAL_TOKENS, special_ids):
    assert tok(t, add_special_tokens=False)["input_ids"] == [i]
  assert tok.decode(enc) == chat
  for text in [r["process"] for r in train] + ["héllo wörld 😀 \t\n 12:34-56:07 {}[]"]:
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
  # The BPE learned the dataset: a trace is much shorter in tokens than in bytes.
  assert len(tok(train[0]["process"])["input_ids"]) < len(train[0]["process"].encode()) / 3


@pytest.mark.parametrize("qtype", sorted(synthetic.NUM_OBJECTS))
def test_every_question_type_answers_right(qtype):
  """Types outside the default mix too: the script is built so the asked-for letter is right."""
  rng = np.random.default_rng(5)
  for letter in "ABCD" * 3:
    r = synthetic.make_sample(rng, qtype, letter)
    assert r["options"]["ABCD".index(letter)][3:] == independent_answer(r)
    assert synthetic.answer_from_events(r) == letter
    assert r["process"].endswith(f"<answer>{letter}</answer>")
