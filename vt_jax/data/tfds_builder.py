"""A prepared dataset: sampled, resized frames stored once, so pod hosts never decode long videos.

`PreparedVideos` is a tensorflow-datasets `GeneratorBasedBuilder` writing `array_record` files, and it
needs no tensorflow: frames are stored as encoded image bytes in `Tensor` features (tfds' Image/Video
features need TF). One example per record:

  frames          [n] encoded frames (JPEG by default, PNG for lossless), RGB, the resized frames
                  exactly as `video.load_video` produces them before normalisation
  grid_thw        int64 [3];  is_video bool
  video           JSON: frame_indices, timestamps, video_fps, total_frames, sampled_fps,
                  second_per_grid (JSON keeps float64 exactly; tfds stores float tensors as float32)
  record          the record's JSON (its file fields + source_file + index)

Reading decodes the frames with OpenCV and runs the same `normalize` + `patchify` as `load_video`,
so a prepared sample equals the directly loaded one up to the frame codec: identical with PNG. JPEG is
written at quality 95 with full-resolution chroma (4:4:4). Measured |prepared - direct| of normalised
pixels (one uint8 level = 0.015 in these units), `python -m vt_jax.data.prepare --measure N`:

  | frames                                              | JPEG max / mean | bytes per 16-frame sample |
  | 224x420 from the 640x360 benchmark videos (H.264)   | 0.32 / 0.0070   | JPEG 160 KB, PNG 357 KB    |
  | 112x112 synthetic (flat colours, hard edges)        | 0.24 / 0.0032   | (4:2:0 chroma: 0.92 max)   |

Geometry, frame indices, timestamps and `second_per_grid` are stored exactly.

Example order is the record order (tfds shuffling disabled), so training from the records or from the
prepared dataset sees the same sequence of samples.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from typing import Any, Iterator, Literal, Mapping, Sequence

import cv2
import numpy as np

from vt_jax.data import records as records_lib
from vt_jax.data import video as video_lib
from vt_jax.data.sequences import VisionInput

FORMAT_VERSION = "1.0.0"


class PreparedDataError(ValueError):
  """A prepared example or directory is unusable."""


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def sampling_to_dict(sampling: video_lib.VideoSampling) -> dict[str, Any]:
  return dataclasses.asdict(sampling)


def sampling_from_dict(d: Mapping[str, Any]) -> video_lib.VideoSampling:
  return video_lib.VideoSampling(**d)


def load_vision(record: records_lib.Record, sampling: video_lib.VideoSampling, *,
                keep_uint8: bool = False):
  """Load a record's video (or image) from disk. Returns `video.VideoFrames` / `video.ImageFrames`.

  Raises video.VideoError (the loader skips or stops on it, per config).
  """
  if record.video_path is None:
    raise video_lib.VideoNotFoundError(record.path, "no video root given for this record")
  if record.data_type == "image":
    return video_lib.load_image(record.video_path, patch_size=sampling.patch_size,
                                merge_size=sampling.merge_size,
                                temporal_patch_size=sampling.temporal_patch_size, resize=sampling.resize)
  return video_lib.load_video(record.video_path, sampling, keep_uint8=keep_uint8)


def vision_input(frames) -> VisionInput:
  """`video.VideoFrames` / `video.ImageFrames` -> the `VisionInput` of a sample."""
  is_video = isinstance(frames, video_lib.VideoFrames)
  return VisionInput(pixel_values=frames.pixel_values, grid_thw=tuple(int(x) for x in frames.grid_thw),
                     second_per_grid=float(frames.second_per_grid) if is_video else 0.0,
                     is_video=is_video)


def record_to_json(record: records_lib.Record) -> str:
  return json.dumps({**record.to_json(), "source_file": record.source_file, "index": record.index},
                    ensure_ascii=False)


def record_from_json(text: str | bytes) -> records_lib.Record:
  """Inverse of `record_to_json` (validated again; the video path is not needed any more)."""
  raw = json.loads(text)
  file, index = raw.pop("source_file"), raw.pop("index")
  return records_lib.validate_record(raw, file, index, video_roots=None)


def _resized_image(record: records_lib.Record, sampling: video_lib.VideoSampling):
  """The uint8 resized frame `load_image` would patchify ([1, h, w, 3]) and its grid."""
  if record.video_path is None:
    raise video_lib.VideoNotFoundError(record.path, "no video root given for this record")
  if not os.path.isfile(record.video_path):
    raise video_lib.ImageError(record.video_path, "file does not exist")
  bgr = cv2.imread(record.video_path, cv2.IMREAD_COLOR)
  if bgr is None:
    raise video_lib.ImageError(record.video_path, "OpenCV cannot decode the image")
  factor = sampling.patch_size * sampling.merge_size
  try:
    h, w = video_lib.smart_resize(bgr.shape[0], bgr.shape[1], factor, video_lib.IMAGE_MIN_PIXELS,
                                  video_lib.IMAGE_MAX_PIXELS)
  except ValueError as e:
    raise video_lib.ImageError(record.video_path, str(e)) from None
  frame = video_lib.resize_frames(np.ascontiguousarray(bgr[None, ..., ::-1]), h, w, sampling.resize)
  grid = (1, h // sampling.patch_size, w // sampling.patch_size)
  return frame, grid


def encode_example(record: records_lib.Record, sampling: video_lib.VideoSampling, *,
                   image_format: Literal["jpeg", "png"] = "jpeg", jpeg_quality: int = 95) -> dict[str, Any]:
  """Load one record's video and encode it as a prepared example (raises video.VideoError)."""
  if record.data_type == "image":
    frames_uint8, grid_thw = _resized_image(record, sampling)
    video = {"frame_indices": [0], "timestamps": [0.0], "video_fps": 0.0, "total_frames": 1,
             "sampled_fps": 0.0, "second_per_grid": 0.0}
  else:
    vf = load_vision(record, sampling, keep_uint8=True)
    frames_uint8, grid_thw = vf.frames_uint8, vf.grid_thw
    video = {"frame_indices": np.asarray(vf.frame_indices).tolist(),
             "timestamps": np.asarray(vf.timestamps, np.float64).tolist(),
             "video_fps": float(vf.video_fps), "total_frames": int(vf.total_frames),
             "sampled_fps": float(vf.sampled_fps), "second_per_grid": float(vf.second_per_grid)}
  # Full-resolution chroma (4:4:4): the default 4:2:0 subsampling smears colour edges by up to ~60 uint8
  # levels; 4:4:4 costs ~30% more bytes and cuts the worst case by 4x (see the module docstring).
  ext, params = (".jpg", [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality), cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                          cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]) if image_format == "jpeg" else (
      ".png", [cv2.IMWRITE_PNG_COMPRESSION, 3])
  frames = []
  for rgb in frames_uint8:  # one C call per frame
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(rgb[..., ::-1]), params)
    if not ok:
      raise PreparedDataError(f"{record.video_path}: OpenCV could not encode a frame as {image_format}")
    frames.append(buf.tobytes())
  return {
      "frames": frames,
      "grid_thw": np.asarray(grid_thw, np.int64),
      "is_video": record.data_type != "image",
      "video": json.dumps(video),
      "record": record_to_json(record),
  }


def decode_example(example: Mapping[str, Any], *, temporal_patch_size: int = 2, patch_size: int = 14,
                   merge_size: int = 2) -> tuple[records_lib.Record, VisionInput, dict[str, Any]]:
  """A prepared example (as read from the data source) -> (record, vision input, video metadata)."""
  record = record_from_json(example["record"])
  frames = []
  for k, buf in enumerate(example["frames"]):
    bgr = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
      raise PreparedDataError(f"{record.source_file}, record {record.index}: frame {k} does not decode")
    frames.append(bgr[..., ::-1])
  if not frames:
    raise PreparedDataError(f"{record.source_file}, record {record.index}: no frames stored")
  pixel_values, grid = video_lib.pixel_values(np.stack(frames), temporal_patch_size, patch_size, merge_size)
  stored = np.asarray(example["grid_thw"]).tolist()
  if grid.tolist() != stored:
    raise PreparedDataError(f"{record.source_file}, record {record.index}: frames give grid "
                            f"{grid.tolist()}, stored grid_thw is {stored}")
  meta = json.loads(example["video"])
  vision = VisionInput(pixel_values, tuple(stored), float(meta["second_per_grid"]),
                       bool(example["is_video"]))
  return record, vision, meta


def _encode_job(args):
  """Worker body for parallel preparation: (key, record, settings) -> (key, example or error)."""
  key, record, sampling, image_format, jpeg_quality = args
  try:
    return key, encode_example(record, sampling, image_format=image_format, jpeg_quality=jpeg_quality)
  except video_lib.VideoError as e:
    return key, e.__class__.__name__ + ": " + str(e)


def _make_builder_class():
  tfds = _tfds()

  class PreparedVideos(tfds.core.GeneratorBasedBuilder):
    """Records + their sampled, resized frames (see the module docstring)."""

    VERSION = tfds.core.Version(FORMAT_VERSION)
    RELEASE_NOTES = {FORMAT_VERSION: "Frames as encoded image bytes + metadata; no tensorflow."}
    # Nothing is downloaded, so there is no checksums file to locate next to the code (locating it in an
    # editable install needs the optional `importlib_resources` package).
    code_path = None

    def __init__(self, *, splits: Mapping[str, Sequence[records_lib.Record]] | None = None,
                 sampling: video_lib.VideoSampling = video_lib.VideoSampling(),
                 image_format: Literal["jpeg", "png"] = "jpeg", jpeg_quality: int = 95,
                 on_bad_video: Literal["skip", "raise"] = "skip", num_workers: int = 0,
                 progress: bool = True, **kwargs):
      if image_format not in ("jpeg", "png"):
        raise PreparedDataError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
      if on_bad_video not in ("skip", "raise"):
        raise PreparedDataError(f"on_bad_video must be 'skip' or 'raise', got {on_bad_video!r}")
      self._splits = dict(splits or {})
      self._sampling = sampling
      self._image_format = image_format
      self._jpeg_quality = jpeg_quality
      self._on_bad_video = on_bad_video
      self._num_workers = num_workers
      self._progress = progress
      self.skipped: dict[str, list[dict[str, Any]]] = {}
      kwargs.setdefault("file_format", "array_record")
      super().__init__(**kwargs)

    def _info(self):
      f = tfds.features
      return tfds.core.DatasetInfo(
          builder=self,
          description="Video-Thinker records with pre-sampled, resized frames (vt_jax.data.tfds_builder).",
          features=f.FeaturesDict({
              "frames": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
              "grid_thw": f.Tensor(shape=(3,), dtype=np.int64),
              "is_video": f.Tensor(shape=(), dtype=np.bool_),
              "video": f.Text(),
              "record": f.Text(),
          }),
          disable_shuffling=True,  # keep record order: same sample sequence as the records source
          metadata=tfds.core.MetadataDict(
              sampling=sampling_to_dict(self._sampling), image_format=self._image_format,
              jpeg_quality=self._jpeg_quality, skipped=self.skipped),
      )

    def _split_generators(self, dl_manager):
      if not self._splits:
        raise PreparedDataError("no records given: PreparedVideos(splits={'train': records, ...})")
      return {name: self._generate_examples(name, recs) for name, recs in self._splits.items()}

    def _generate_examples(self, split: str, recs: Sequence[records_lib.Record]) -> Iterator:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      jobs = ((f"{k:09d}", r, self._sampling, self._image_format, self._jpeg_quality)
              for k, r in enumerate(recs))
      skipped = self.skipped.setdefault(split, [])
      pool = multiprocessing.get_context("spawn").Pool(self._num_workers) if self._num_workers else None
      try:
        results = pool.imap(_encode_job, jobs, chunksize=1) if pool else map(_encode_job, jobs)
        bar = tqdm(results, total=len(recs), desc=f"preparing {split}", unit="video",
                   disable=not self._progress)
        for (key, out), rec in zip(bar, recs):
          if isinstance(out, str):
            if self._on_bad_video == "raise":
              raise PreparedDataError(f"{rec.source_file}, record {rec.index}, video {rec.video_path}: {out}")
            skipped.append({"source_file": rec.source_file, "index": rec.index,
                            "path": rec.video_path, "error": out})
            bar.set_postfix(skipped=len(skipped))
            continue
          yield key, out
      finally:
        if pool is not None:
          pool.terminate()

  return PreparedVideos


_BUILDER_CLASS = None


def builder_class():
  """The `PreparedVideos` tfds builder class (created on first use: importing tfds is not free)."""
  global _BUILDER_CLASS
  if _BUILDER_CLASS is None:
    _BUILDER_CLASS = _make_builder_class()
  return _BUILDER_CLASS


def prepare(splits: Mapping[str, Sequence[records_lib.Record]], data_dir: str | os.PathLike, *,
            sampling: video_lib.VideoSampling = video_lib.VideoSampling(), image_format="jpeg",
            jpeg_quality: int = 95, on_bad_video="skip", num_workers: int = 0,
            progress: bool = True):
  """Build the prepared dataset under `data_dir`. Returns the builder (`.data_dir` is the dataset dir,
  `.skipped` the bad videos per split)."""
  builder = builder_class()(splits=splits, sampling=sampling, image_format=image_format,
                            jpeg_quality=jpeg_quality, on_bad_video=on_bad_video,
                            num_workers=num_workers, progress=progress, data_dir=os.fspath(data_dir))
  builder.download_and_prepare()
  return builder


@dataclasses.dataclass(frozen=True)
class PreparedSource:
  """A split of a prepared dataset: random-access source for grain, plus how it was sampled."""
  data_source: Any
  sampling: video_lib.VideoSampling
  image_format: str
  skipped: list[dict[str, Any]]
  path: str
  split: str

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int):
    return self.data_source[index]


def open_prepared(path: str | os.PathLike, split: str = "train") -> PreparedSource:
  """Open a prepared dataset directory (the versioned dir, e.g. `<data_dir>/prepared_videos/1.0.0`,
  or `<data_dir>` itself when it holds exactly one version)."""
  tfds = _tfds()
  path = os.fspath(path)
  if not os.path.exists(os.path.join(path, "dataset_info.json")):
    candidates = [os.path.join(path, "prepared_videos", v)
                  for v in sorted(os.listdir(os.path.join(path, "prepared_videos")))] \
        if os.path.isdir(os.path.join(path, "prepared_videos")) else []
    candidates = [c for c in candidates if os.path.exists(os.path.join(c, "dataset_info.json"))]
    if len(candidates) != 1:
      raise PreparedDataError(f"{path}: not a prepared dataset directory (no dataset_info.json; "
                              f"found versions {candidates})")
    path = candidates[0]
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise PreparedDataError(f"{path}: no split {split!r} (has {list(builder.info.splits)})")
  meta = builder.info.metadata or {}
  if "sampling" not in meta:
    raise PreparedDataError(f"{path}: metadata.json lacks the sampling settings; was it written by "
                            f"vt_jax.data.prepare?")
  return PreparedSource(data_source=builder.as_data_source(split),
                        sampling=sampling_from_dict(meta["sampling"]),
                        image_format=meta.get("image_format", "jpeg"),
                        skipped=list(meta.get("skipped", {}).get(split, [])), path=path, split=split)
