"""Video and image frames exactly as Qwen2.5-VL sees them (qwen-vl-utils + the HF processor).

Pipeline for one video (`load_video`):

  probe (frame count, fps) -> `sample_frame_indices` (qwen-vl-utils `smart_nframes` and
  `calculate_video_frame_range`, then round(linspace(start_frame, end_frame, n)))
  -> `decode_frames` (OpenCV, only the needed frames) -> `resize_frames` to `smart_resize` dims
  -> `normalize` (1/255, CLIP mean/std) -> `patchify` (Qwen patch order, `[n_patches, 1176]`).

The tfds-prepared path stores the resized uint8 frames (JPEG) and calls `pixel_values(x)` (=
`patchify(normalize(x))`) at load time, so every stage is public and pure where it can be.

Resize (why "exact" is the default)
-----------------------------------
The reference resizes uint8 frames with torchvision's bicubic + antialias on float, then clamps,
rounds and casts back to uint8 (torchvision's uint8 path), and only then calls `.float()`. That
computation is a separable filter (PIL-style cubic, a = -0.5, stretched by the scale when
downscaling, weights renormalised per output pixel). `resize_frames(method="exact")` rebuilds those
filter weights as two sparse matrices and applies them with scipy; `method="opencv"` uses
cv2.INTER_AREA when shrinking and cv2.INTER_CUBIC when enlarging (the closest OpenCV modes we found).
Measured against `torch.nn.functional.interpolate(bicubic, antialias=True)` + clamp/round, on
16 synthetic frames (blurred noise + solid shapes + text), differences of NORMALISED pixels
(i.e. after /255 and /std, so one uint8 level is ~0.015):

  | source -> target   | exact max / mean     | opencv max / mean | exact ms | opencv ms | torch ms |
  | 240x320 -> 280x392 | 0.015 / 1.1e-6       | 0.225 / 0.0077    | 15       | 1.6       | 120      |
  | 360x640 -> 252x448 | 0.015 / 1.8e-6       | 0.327 / 0.013     | 30       | --        | --       |
  | 720x1280 -> 224x420| 0.015 / 3.3e-6       | 0.511 / 0.024     | 117      | 34        | 409      |
  | 1080x1920->224x392 | 0.015 / 4.5e-6       | 0.453 / 0.031     | 268      | 67        | 661      |
  | 112x112 -> 336x336 | 0.015 / 1e-7         | 0.270 / 0.0074    | 7        | 1.2       | 13       |

("exact" differs from the reference only by a single uint8 level on 0.01-0.03% of pixels, where
float summation order decides a .5 tie.) OpenCV is 3-4x faster but drifts by up to ~35 uint8 levels
on sharp edges (its INTER_AREA is a box filter and INTER_CUBIC has a = -0.75 and no antialias);
a model pre-trained on the reference pixels should see the reference pixels, and decoding, not
resizing, dominates load time (see benchmarks/bench_pipeline.py), so "exact" is the default.

Decoding
--------
`decode_frames` seeks (CAP_PROP_POS_FRAMES, exact on the H.264/HEVC/mp4v files we tested) when the
gap to the next wanted frame is large, and grab()s forward through small gaps (grab decodes but
skips the colour conversion). A seek costs the decoding from the previous keyframe, so the
crossover depends on the GOP, which OpenCV does not expose: `_SeekCostModel` times seeks and grabs
on the stream being read and picks the cheaper per gap (measured crossovers: ~32 frames for mp4v
with GOP 12, beyond 120 frames for x264's default GOP 250, both 640x360 at 30 fps).

H.264 (most video datasets) and HEVC are decoded more cheaply still (`_plan_refs`, strategy
"refs", used by "auto" where it applies): one demux pass in OpenCV's raw mode (packets, no
decoding) cuts the stream into IDR periods, skips the periods without a wanted frame, and within
the others keeps only the reference pictures up to the last wanted one plus the wanted pictures
(H.264: nal_ref_idc > 0; HEVC: all but sub-layer non-reference pictures of the top temporal
layer); x264's and x265's default streams have about half their pictures unreferenced. The kept
packets are decoded as a raw stream from memory. The frames are bit-identical to the plain
decode; where that cannot be guaranteed (an edit list hiding frames of a stream-copy cut,
timestamps that cannot be ranked, a stream not starting with an IDR, a raw decode whose frame 0
differs from the plain one) the seek / grab path runs instead, as it does where it would decode
fewer pictures (open-GOP streams, whose only IDR may be the first picture, seek to their I / CRA
pictures). 640x360 H.264 (GOP 250), 16 frames from 60 / 120 / 180 s: see
benchmarks/bench_pipeline.py for the measured times.

Interlaced H.264 (field-coded pictures, read from the SPS and slice headers) is refused with
UnsupportedCodecError: OpenCV 5.0's FFmpeg build fails to convert such frames to BGR and returns
uninitialised buffers without an error.

Errors are `VideoError` subclasses naming the file and the reason; a frame count that the
container over-reports (truncated files) is detected when reads fail and, in `load_video`, the
indices are re-sampled over the frames that really decode (or `TruncatedVideoError` is raised).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
import struct
import time
from typing import Literal

import cv2
import numpy as np
import scipy.sparse

# qwen-vl-utils constants (video path) and HF processor defaults (image path).
IMAGE_FACTOR = 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
VIDEO_THINKER_MAX_PIXELS = 128 * 28 * 28
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Until both costs have been timed on a stream, forward gaps up to this many frames are grabbed
# through and larger ones seek: the mp4v (GOP 12) crossover measured at 640x360 (see
# `_SeekCostModel`); the online cost model takes over after the first seek and grab.
SEEK_MIN_GAP = 32

# Codecs the bundled FFmpeg of opencv-python-headless cannot decode (no AV1 decoder is built in).
UNSUPPORTED_FOURCCS = frozenset({"AV01", "av01"})

ResizeMethod = Literal["exact", "opencv"]
DecodeStrategy = Literal["auto", "seek", "grab", "refs"]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------
class VideoError(Exception):
  """A video (or image) could not be turned into frames. `.path` is the file, `.reason` why."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")


class VideoNotFoundError(VideoError):
  """The path does not exist or is not a regular file."""


class EmptyVideoFileError(VideoError):
  """The file has zero bytes (an interrupted download or copy)."""


class CorruptVideoError(VideoError):
  """OpenCV cannot open the container at all (garbage bytes, truncated header, missing index)."""


class NoDecodableFramesError(VideoError):
  """The container opens but not a single frame decodes."""


class UnsupportedCodecError(VideoError):
  """The stream's codec (e.g. AV1) has no decoder in OpenCV's FFmpeg build."""


class TruncatedVideoError(VideoError):
  """Fewer frames decode than needed: the container over-reports its frame count, or the video
  is too short for the requested sampling. `.decodable_frames` is the real count (or None)."""

  def __init__(self, path, reason, decodable_frames: int | None = None):
    super().__init__(path, reason)
    self.decodable_frames = decodable_frames


class ImageError(VideoError):
  """An image file is missing, empty or undecodable (images share the video error base)."""


# --------------------------------------------------------------------------------------------
# Sampling configuration and the pure index / size math
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoSampling:
  """How to sample and size one video; defaults are Video-Thinker's (16 frames, 128*28*28 px).

  nframes: fixed frame count (rounded to a multiple of temporal_patch_size); None -> fps mode.
  fps: frames per second to sample in fps mode (None -> qwen-vl-utils' 2.0).
  min_frames / max_frames: fps-mode clamp (qwen-vl-utils FPS_MIN_FRAMES / FPS_MAX_FRAMES).
  min_pixels / max_pixels / total_pixels: per-frame pixel budget, as qwen-vl-utils' fetch_video.
  start / end: time window in seconds (qwen-vl-utils `video_start` / `video_end`).
  resize: "exact" (reference filter) or "opencv" (faster, see the module docstring).
  decode: `decode_frames` strategy. "auto" (H.264 / HEVC from reference pictures where that decodes fewer
    pictures, which reads the file sequentially up to the IDR after the last sampled frame); "seek"
    reads least of a long video, for storage where reading is dearer than decoding (network mounts).
  """

  nframes: int | None = 16
  fps: float | None = None
  min_frames: int = FPS_MIN_FRAMES
  max_frames: int = FPS_MAX_FRAMES
  min_pixels: int = VIDEO_MIN_PIXELS
  max_pixels: int | None = VIDEO_THINKER_MAX_PIXELS
  total_pixels: int = VIDEO_TOTAL_PIXELS
  start: float | None = None
  end: float | None = None
  temporal_patch_size: int = 2
  patch_size: int = 14
  merge_size: int = 2
  resize: ResizeMethod = "exact"
  decode: DecodeStrategy = "auto"

  def __post_init__(self):
    if self.nframes is not None and self.fps is not None:
      raise ValueError(
          f"VideoSampling: nframes={self.nframes} and fps={self.fps} are exclusive; "
          "set nframes=None to sample by fps")
    if self.nframes is not None and self.nframes < 1:
      raise ValueError(f"VideoSampling: nframes must be >= 1, got {self.nframes}")
    if self.fps is not None and not self.fps > 0:
      raise ValueError(f"VideoSampling: fps must be > 0, got {self.fps}")
    if self.resize not in ("exact", "opencv"):
      raise ValueError(f"VideoSampling: resize must be 'exact' or 'opencv', got {self.resize!r}")
    if self.decode not in ("auto", "seek", "grab", "refs"):
      raise ValueError(f"VideoSampling: decode must be 'auto', 'seek', 'grab' or 'refs', got {self.decode!r}")

  @property
  def factor(self) -> int:
    """Side lengths are multiples of this (patch 14 x merge 2 = 28)."""
    return self.patch_size * self.merge_size


def _round_by(x: float, f: int) -> int:
  return round(x / f) * f


def _ceil_by(x: float, f: int) -> int:
  return math.ceil(x / f) * f


def _floor_by(x: float, f: int) -> int:
  return math.floor(x / f) * f


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR,
                 min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
  """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels],
  aspect ratio kept as well as rounding allows (qwen-vl-utils' formula).

  Raises ValueError when the aspect ratio exceeds 200 or a side is not positive.
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"smart_resize: sides must be positive, got {height}x{width}")
  if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
    raise ValueError(f"smart_resize: aspect ratio {max(height, width) / min(height, width):.1f} "
                     f"of {height}x{width} exceeds {MAX_ASPECT_RATIO}")
  h_bar = max(factor, _round_by(height, factor))
  w_bar = max(factor, _round_by(width, factor))
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, _floor_by(height / beta, factor))
    w_bar = max(factor, _floor_by(width / beta, factor))
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = _ceil_by(height * beta, factor)
    w_bar = _ceil_by(width * beta, factor)
  return h_bar, w_bar


def video_max_pixels(nframes: int, sampling: VideoSampling) -> int | float:
  """Per-frame pixel cap of qwen-vl-utils' fetch_video: the share of `total_pixels` per temporal
  pair, within [1.05 * min_pixels, VIDEO_MAX_PIXELS]; a caller's max_pixels can only lower it."""
  cap = max(min(VIDEO_MAX_PIXELS, sampling.total_pixels / nframes * FRAME_FACTOR),
            int(sampling.min_pixels * 1.05))
  if sampling.max_pixels is not None:
    cap = min(sampling.max_pixels, cap)
  return cap


def video_resize_dims(height: int, width: int, nframes: int,
                      sampling: VideoSampling) -> tuple[int, int]:
  """(resized_height, resized_width) for a video of `nframes` sampled frames of height x width."""
  return smart_resize(height, width, factor=sampling.factor, min_pixels=sampling.min_pixels,
                      max_pixels=video_max_pixels(nframes, sampling))


def frame_window(total_frames: int, video_fps: float, start: float | None,
                 end: float | None) -> tuple[int, int, int]:
  """(start_frame, end_frame, window_frames) for a [start, end] seconds window, inclusive
  (qwen-vl-utils' calculate_video_frame_range: start rounds up, end rounds down)."""
  if not video_fps > 0:
    raise ValueError(f"video_fps must be > 0, got {video_fps}")
  if total_frames <= 0:
    raise ValueError(f"total_frames must be > 0, got {total_frames}")
  if start is None and end is None:
    return 0, total_frames - 1, total_frames
  duration = total_frames / video_fps
  start_frame = 0 if start is None else math.ceil(max(0.0, min(start, duration)) * video_fps)
  end_frame = total_frames - 1
  if end is not None:
    end_frame = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1)
  if start_frame >= end_frame:
    raise ValueError(f"time window [{start}, {end}] s selects frames {start_frame}..{end_frame} "
                     f"of a {duration:.2f} s video ({total_frames} frames at {video_fps} fps)")
  return start_frame, end_frame, end_frame - start_frame + 1


def num_sampled_frames(window_frames: int, video_fps: float, sampling: VideoSampling) -> int:
  """qwen-vl-utils' smart_nframes over a window of `window_frames` frames.

  Raises ValueError when the result falls outside [temporal_patch_size, window_frames].
  """
  tp = sampling.temporal_patch_size
  if sampling.nframes is not None:
    n = _round_by(sampling.nframes, tp)
  else:
    fps = FPS if sampling.fps is None else sampling.fps
    min_frames = _ceil_by(sampling.min_frames, tp)
    max_frames = _floor_by(min(sampling.max_frames, window_frames), tp)
    n = window_frames / video_fps * fps
    n = _floor_by(min(max(n, min_frames), max_frames, window_frames), tp)
  if not tp <= n <= window_frames:
    raise ValueError(f"cannot sample {n} frames (multiple of {tp}) from {window_frames} frames")
  return int(n)


def sample_frame_indices(total_frames: int, video_fps: float,
                         sampling: VideoSampling) -> np.ndarray:
  """Frame indices `[n]` (int64, ascending) that qwen-vl-utils decodes for this video.

  round(linspace(start_frame, end_frame, n)) with round-half-even like torch.round; computed in
  float64 (torch uses float32, which only matters beyond ~10^6 frames).
  """
  start_frame, end_frame, window = frame_window(total_frames, video_fps, sampling.start,
                                                sampling.end)
  n = num_sampled_frames(window, video_fps, sampling)
  return np.round(np.linspace(start_frame, end_frame, n)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Pixels: resize, normalise, patchify (pure)
# --------------------------------------------------------------------------------------------
def _cubic_aa(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys cubic kernel with a = -0.5 (PIL / torch antialias convention)."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resize_weights(in_size: int, out_size: int) -> scipy.sparse.csr_matrix:
  """Sparse `[out_size, in_size]` float32 matrix of antialiased bicubic resampling along one axis
  (align_corners=False): the support widens by the scale when shrinking, weights sum to 1."""
  scale = in_size / out_size
  support = 2.0 * scale if scale >= 1.0 else 2.0
  inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
  centre = scale * (np.arange(out_size) + 0.5)
  # Truncation toward zero, as the reference's int64 cast does.
  lo = np.maximum(np.trunc(centre - support + 0.5).astype(np.int64), 0)
  hi = np.minimum(np.trunc(centre + support + 0.5).astype(np.int64), in_size)
  taps = int((hi - lo).max())
  src = lo[:, None] + np.arange(taps)[None, :]
  w = _cubic_aa((src - centre[:, None] + 0.5) * inv_scale)
  w = np.where(src < hi[:, None], w, 0.0)
  w /= w.sum(axis=1, keepdims=True)
  rows = np.repeat(np.arange(out_size), taps)
  mat = scipy.sparse.csr_matrix((w.ravel(), (rows, np.minimum(src, in_size - 1).ravel())),
                                shape=(out_size, in_size), dtype=np.float64)
  return mat.astype(np.float32)


def resize_frames(frames: np.ndarray, height: int, width: int,
                  method: ResizeMethod = "exact") -> np.ndarray:
  """Resize uint8 frames `[T, H, W, 3]` -> uint8 `[T, height, width, 3]`.

  "exact": the reference's bicubic-antialias filter, rounded and clamped to uint8 as torchvision
  does for uint8 input; "opencv": INTER_AREA when shrinking, INTER_CUBIC when enlarging.
  """
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"resize_frames expects uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
  t, h0, w0, c = frames.shape
  if (h0, w0) == (height, width):
    return frames.copy()
  out = np.empty((t, height, width, c), np.uint8)
  if method == "opencv":
    interp = cv2.INTER_AREA if height * width < h0 * w0 else cv2.INTER_CUBIC
    for i in range(t):  # one C call per frame; cv2 has no batched resize
      out[i] = cv2.resize(frames[i], (width, height), interpolation=interp)
    return out
  if method != "exact":
    raise ValueError(f"resize_frames: unknown method {method!r}")
  rows = resize_weights(h0, height)
  cols = resize_weights(w0, width)
  for i in range(t):  # per frame keeps the float32 temporaries small
    x = frames[i].astype(np.float32)
    # Width first, as the reference does (summation order decides rare .5 ties).
    y = cols @ x.transpose(1, 0, 2).reshape(w0, h0 * c)           # [width, h0 * c]
    y = y.reshape(width, h0, c).transpose(1, 0, 2).reshape(h0, width * c)
    y = rows @ y                                                  # [height, width * c]
    np.clip(np.rint(y), 0, 255, out=y)
    out[i] = y.reshape(height, width, c)
  return out


def normalize(frames: np.ndarray) -> np.ndarray:
  """uint8 (or float 0..255) `[..., 3]` RGB -> float32 `(x / 255 - CLIP_MEAN) / CLIP_STD`."""
  x = np.asarray(frames, np.float32) * np.float32(1.0 / 255.0)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def patchify(frames: np.ndarray, temporal_patch_size: int = 2, patch_size: int = 14,
             merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """Normalised frames `[T, H, W, C]` -> (pixel_values `[gt*gh*gw, C*tp*p*p]`, grid_thw `[3]`).

  Rows follow Qwen's order: temporal group, then 2x2 merge blocks in raster order, then the
  four patches of a block; each row flattens (C, tp, p, p), the Conv3d patch-embed layout.
  The frame count is padded to a multiple of temporal_patch_size by repeating the last frame.
  H and W must be multiples of patch_size * merge_size. uint8 frames stay uint8 (see
  `pixel_values`); anything else becomes float32.
  """
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    frames = frames.astype(np.float32, copy=False)
  if frames.ndim != 4:
    raise ValueError(f"patchify expects [T, H, W, C], got shape {frames.shape}")
  t, h, w, c = frames.shape
  factor = patch_size * merge_size
  if t == 0 or h % factor or w % factor:
    raise ValueError(f"patchify: need T >= 1 and H, W multiples of {factor}, got {frames.shape}")
  if pad := -t % temporal_patch_size:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    t += pad
  gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
  x = frames.reshape(gt, temporal_patch_size, gh // merge_size, merge_size, patch_size,
                     gw // merge_size, merge_size, patch_size, c)
  # -> (gt, gh/m, gw/m, m_h, m_w, C, tp, p_h, p_w)
  x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
  pixel_values = np.ascontiguousarray(x).reshape(gt * gh * gw,
                                                 c * temporal_patch_size * patch_size**2)
  return pixel_values, np.array([gt, gh, gw], np.int64)


def pixel_values(frames: np.ndarray, temporal_patch_size: int = 2, patch_size: int = 14,
                 merge_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """uint8 RGB frames `[T, H, W, 3]` -> `patchify(normalize(frames))`, bit for bit, but cheaper: the
  patch transpose moves uint8 (a quarter of the bytes) and the normalisation runs in place on the rows,
  each column with its channel's mean and std (the same float32 operations, so the same values)."""
  frames = np.asarray(frames)
  if frames.dtype != np.uint8:
    raise ValueError(f"pixel_values expects uint8 frames, got {frames.dtype}")
  rows, grid_thw = patchify(frames, temporal_patch_size, patch_size, merge_size)
  per_channel = rows.shape[1] // len(CLIP_MEAN)  # columns are (C, tp, p, p)
  x = rows.astype(np.float32)
  x *= np.float32(1.0 / 255.0)
  x -= np.repeat(np.asarray(CLIP_MEAN, np.float32), per_channel)
  x /= np.repeat(np.asarray(CLIP_STD, np.float32), per_channel)
  return x, grid_thw


# --------------------------------------------------------------------------------------------
# Decoding with OpenCV
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoInfo:
  """What the container says: frame count (may be over-reported), fps, size, codec FourCC."""
  path: str
  total_frames: int
  fps: float
  height: int
  width: int
  fourcc: str


def _check_file(path: str, error: type[VideoError] = VideoError) -> None:
  if not os.path.exists(path):
    raise (ImageError if error is ImageError else VideoNotFoundError)(path, "file does not exist")
  if not os.path.isfile(path):
    raise (ImageError if error is ImageError else VideoNotFoundError)(path, "not a regular file")
  if os.path.getsize(path) == 0:
    raise (ImageError if error is ImageError else EmptyVideoFileError)(path, "file is empty (0 bytes)")


def _fourcc(cap: cv2.VideoCapture) -> str:
  code = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
  text = code.to_bytes(4, "little").decode("latin-1")
  return text if text.isprintable() else f"0x{code:08x}"


def _open(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
  path = os.fspath(path)
  _check_file(path)
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  if not cap.isOpened():
    raise CorruptVideoError(path, "OpenCV/FFmpeg cannot open the container (corrupt, truncated "
                            "or not a video)")
  info = VideoInfo(path=path, total_frames=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
                   fps=float(cap.get(cv2.CAP_PROP_FPS)),
                   height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                   width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), fourcc=_fourcc(cap))
  if not (info.fps > 0 and math.isfinite(info.fps)):
    cap.release()
    raise CorruptVideoError(path, f"container reports no usable frame rate ({info.fps})")
  return cap, info


def probe_video(path: str | os.PathLike) -> VideoInfo:
  """Container metadata without decoding. Raises a VideoError subclass for unopenable files."""
  cap, info = _open(path)
  cap.release()
  return info


def _no_frames_error(info: VideoInfo) -> VideoError:
  if info.fourcc in UNSUPPORTED_FOURCCS:
    return UnsupportedCodecError(info.path, f"codec {info.fourcc} (AV1) cannot be decoded by "
                                 "OpenCV's FFmpeg build; re-encode to H.264")
  return NoDecodableFramesError(info.path, f"no frame decodes (codec {info.fourcc}, container "
                                f"claims {info.total_frames} frames)")


def _count_decodable(path: str, info: VideoInfo, known_good: int) -> int:
  """Real number of decodable frames, given that frame `known_good` (or -1) decoded.

  Seeks to the last good frame and grabs forward until the stream ends: only used after a read
  failed, so the cost (decoding the tail) is paid only for broken files.
  """
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG)
  try:
    pos = max(known_good, 0)
    if pos > 0:
      cap.set(cv2.CAP_PROP_POS_FRAMES, pos)
    count = pos
    while cap.grab():
      count += 1
    return count
  finally:
    cap.release()




class _SeekCostModel:
  """Online estimate of seek vs grab cost for one stream (both in seconds).

  A seek restarts decoding at the previous keyframe, so its cost is about (distance from that
  keyframe) x (per-frame decode): with GOP 12 (mp4v) seeking beats grabbing past ~32 frames, with
  x264's default GOP 250 grabbing wins up to ~120+ frames (benchmarks/bench_pipeline.py). The GOP
  is not exposed by OpenCV, so we time both operations as we go and pick the cheaper per gap.
  """

  def __init__(self, prior_gap: int):
    self.prior_gap = prior_gap
    self.grab_s: float | None = None
    self.seek_s: float | None = None

  def should_seek(self, gap: int) -> bool:
    if gap < 0:
      return True
    if self.grab_s is None or self.seek_s is None:
      return gap > self.prior_gap
    if gap * self.grab_s > self.seek_s:
      return True
    if gap > self.prior_gap:
      # Grabbing was chosen over a long gap, so the seek estimate is not being refreshed (and the
      # first seek of a stream is often the slowest): decay it so seeking gets re-tried.
      self.seek_s *= 0.8
    return False

  def observe(self, kind: str, seconds: float) -> None:
    old = getattr(self, kind)
    setattr(self, kind, seconds if old is None else 0.7 * old + 0.3 * seconds)


# H.264 FourCCs OpenCV reports (container codec tags, or FFmpeg's codec name as a tag).
H264_FOURCCS = frozenset({"avc1", "AVC1", "avc3", "h264", "H264", "x264", "X264", "davc", "DAVC"})
HEVC_FOURCCS = frozenset({"hvc1", "HVC1", "hev1", "HEV1", "hevc", "HEVC", "h265", "H265", "x265", "X265"})
# Packet bytes the "refs" plan may hold at once (one IDR period); streams needing more are decoded
# by the seek/grab path instead.
REFS_MAX_HELD_BYTES = 256 << 20
# Decoders `_read_refs` runs in parallel threads, each on a run of IDR periods (bounded by
# cv2.getNumThreads() too: set it to cores / workers in data-loading worker processes).
REFS_MAX_DECODERS = 4
# With strategy "auto", an IDR period longer than this (open-GOP streams: IDRs only where forced)
# stops the demux pass; the seek / grab path decodes such streams from their keyframes.
REFS_MAX_PERIOD_PACKETS = 2048


class _Bits:
  """Big-endian bit reader with Exp-Golomb codes over an RBSP (emulation prevention removed)."""

  def __init__(self, data: bytes):
    self.value, self.left = int.from_bytes(data, "big"), len(data) * 8

  def u(self, n: int) -> int:
    if n > self.left:
      raise ValueError("read past the end")
    self.left -= n
    return (self.value >> self.left) & ((1 << n) - 1)

  def ue(self) -> int:
    zeros = 0
    while self.u(1) == 0:
      zeros += 1
      if zeros > 31:
        raise ValueError("bad Exp-Golomb code")
    return (1 << zeros) - 1 + self.u(zeros)

  def se(self) -> int:
    k = self.ue()
    return (k + 1) // 2 if k % 2 else -(k // 2)


_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def _h264_sps(sps: bytes) -> tuple[bool, bool, int, bool]:
  """(frame_mbs_only_flag, mb_adaptive_frame_field_flag, log2_max_frame_num,
  separate_colour_plane_flag) of an H.264 SPS NAL unit, header byte included."""
  b = _Bits(_rbsp(sps[1:]))
  profile = b.u(8)
  b.u(16)  # constraint flags, level_idc
  b.ue()  # seq_parameter_set_id
  separate_planes = False
  if profile in _HIGH_PROFILES:
    chroma = b.ue()
    if chroma == 3:
      separate_planes = bool(b.u(1))
    b.ue(), b.ue(), b.u(1)  # bit depths, qpprime_y_zero_transform_bypass_flag
    if b.u(1):  # seq_scaling_matrix_present_flag
      for i in range(12 if chroma == 3 else 8):
        if b.u(1):
          last = nxt = 8
          for _ in range(16 if i < 6 else 64):
            if nxt:
              nxt = (last + b.se() + 256) % 256
            last = nxt or last
  log2_max_frame_num = b.ue() + 4
  poc_type = b.ue()
  if poc_type == 0:
    b.ue()
  elif poc_type == 1:
    b.u(1), b.se(), b.se()
    for _ in range(b.ue()):
      b.se()
  b.ue(), b.u(1), b.ue(), b.ue()  # max_num_ref_frames, gaps flag, width, height in macroblocks
  frame_mbs_only = bool(b.u(1))
  mbaff = not frame_mbs_only and bool(b.u(1))
  return frame_mbs_only, mbaff, log2_max_frame_num, separate_planes


def _annexb_units(data: bytes) -> list[bytes]:
  """The NAL units of an Annex-B byte stream (start codes and trailing zero bytes removed)."""
  return [u for u in (n.rstrip(b"\x00") for n in data.split(b"\x00\x00\x01")[1:]) if u]


def _rbsp(payload: bytes) -> bytes:
  """A NAL unit's payload without its emulation prevention bytes (00 00 03 -> 00 00)."""
  return payload.replace(b"\x00\x00\x03", b"\x00\x00")


def _h264_interlaced(path: str, cap: cv2.VideoCapture) -> bool:
  """Whether an H.264 stream codes interlaced pictures (field macroblock pairs, or field pictures
  in its first packets), which FFmpeg flags interlaced and OpenCV 5.0's FFmpeg build then fails to
  convert to BGR, returning garbage without an error. Streams that only allow interlaced coding
  (x264's fake-interlaced) decode fine and are not reported. The SPS comes from the container's
  extradata (avcC or Annex B) or, in band, the first packet; False when there is none or it does
  not parse."""
  ok, extra = cap.retrieve(None, int(cap.get(cv2.CAP_PROP_CODEC_EXTRADATA_INDEX)))
  data = extra.tobytes() if ok and extra is not None else b""
  raw = None
  try:
    if len(data) > 8 and data[0] == 1:  # avcC: version, profile, compat, level, length size, SPSs
      sps = [data[8:8 + int.from_bytes(data[6:8], "big")]] if data[5] & 0x1F else []
    else:
      sps = [n for n in _annexb_units(data) if n[0] & 0x1F == 7]
    packets = []
    if not sps:  # parameter sets in band: the first packet carries them
      raw = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
      ok, packet = raw.read()
      packets = [packet.tobytes()] if ok and packet is not None else []
      sps = [n for p in packets for n in _annexb_units(p) if n[0] & 0x1F == 7]
      if not sps:
        return False
    frame_mbs_only, mbaff, log2_max_frame_num, separate_planes = _h264_sps(sps[0])
    if frame_mbs_only or mbaff:
      return mbaff
    # Field pictures are signalled per slice (field_pic_flag): look at the first packets.
    if raw is None:
      raw = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    while len(packets) < 8:
      ok, packet = raw.read()
      if not ok or packet is None:
        break
      packets.append(packet.tobytes())
    for packet in packets:
      for unit in _annexb_units(packet):
        if unit[0] & 0x1F in (1, 5):
          b = _Bits(_rbsp(unit[1:16]))
          b.ue(), b.ue(), b.ue()  # first_mb_in_slice, slice_type, pic_parameter_set_id
          if separate_planes:
            b.u(2)
          b.u(log2_max_frame_num)
          if b.u(1):  # field_pic_flag
            return True
    return False
  except (ValueError, IndexError):
    return False
  finally:
    if raw is not None:
      raw.release()


def _mp4_boxes(f, start: int, end: int):
  """(type, payload start, box end) of the ISO BMFF boxes in [start, end) of file `f`."""
  pos = start
  while pos + 8 <= end:
    f.seek(pos)
    size, kind = struct.unpack(">I4s", f.read(8))
    header = 8
    if size == 1:
      size, header = struct.unpack(">Q", f.read(8))[0], 16
    elif size == 0:
      size = end - pos
    if size < header or pos + size > end:
      return
    yield kind, pos + header, pos + size
    pos += size


def _mp4_child(f, span: tuple[int, int] | None, kind: bytes) -> tuple[int, int] | None:
  if span is None:
    return None
  for k, start, end in _mp4_boxes(f, *span):
    if k == kind:
      return start, end
  return None


def _mp4_shows_every_sample(path: str) -> bool:
  """Whether an ISO BMFF file displays every sample of its one video track as decoded.

  False where an edit list hides samples (clips cut with stream copy start at the keyframe
  before the cut and hide the frames up to it; the plain decode does not return them), where
  the track is fragmented, where a 'colr' box signals colour outside the bitstream (the raw
  stream `_read_refs` decodes would lose it), or where the file does not parse.
  """
  try:
    with open(path, "rb") as f:
      size = os.path.getsize(path)
      moov = _mp4_child(f, (0, size), b"moov")
      if moov is None or _mp4_child(f, moov, b"mvex") is not None:
        return False
      mvhd = _mp4_child(f, moov, b"mvhd")
      f.seek(mvhd[0])
      f.seek(mvhd[0] + (20 if f.read(1)[0] == 1 else 12))
      movie_scale = struct.unpack(">I", f.read(4))[0]
      tracks = []
      for kind, start, end in _mp4_boxes(f, *moov):
        mdia = _mp4_child(f, (start, end), b"mdia") if kind == b"trak" else None
        hdlr = _mp4_child(f, mdia, b"hdlr")
        if hdlr is not None and f.seek(hdlr[0] + 8) is not None and f.read(4) == b"vide":
          tracks.append(((start, end), mdia))
      if len(tracks) != 1:
        return False
      trak, mdia = tracks[0]
      mdhd = _mp4_child(f, mdia, b"mdhd")
      f.seek(mdhd[0])
      v1 = f.read(1)[0] == 1
      f.seek(mdhd[0] + (20 if v1 else 12))
      media_scale, media_duration = struct.unpack(">IQ" if v1 else ">II", f.read(12 if v1 else 8))
      stbl = _mp4_child(f, _mp4_child(f, mdia, b"minf"), b"stbl")
      stsd = _mp4_child(f, stbl, b"stsd")
      if stsd is None:
        return False
      entry = next(_mp4_boxes(f, stsd[0] + 8, stsd[1]), None)  # the sample entry, e.g. 'avc1'
      # VisualSampleEntry: 78 bytes of fields before its child boxes.
      if entry is None or _mp4_child(f, (entry[1] + 78, entry[2]), b"colr") is not None:
        return False
      elst = _mp4_child(f, _mp4_child(f, trak, b"edts"), b"elst")
      if elst is None:
        return True
      f.seek(elst[0])
      v1 = f.read(4)[0] == 1
      edits = [struct.unpack(">Qq" if v1 else ">Ii", f.read(16 if v1 else 8)) + (f.read(4),)
               for _ in range(struct.unpack(">I", f.read(4))[0])]
      edits = [e for e in edits if e[1] != -1]  # empty edits only delay the start
      if not edits:
        return True
      if len(edits) != 1:
        return False
      segment, media_time, _ = edits[0]
      first_cts = 0  # composition offset of sample 0 (an IDR displays first in its period)
      ctts = _mp4_child(f, stbl, b"ctts")
      if ctts is not None:
        f.seek(ctts[0])
        v1 = f.read(4)[0] == 1
        if struct.unpack(">I", f.read(4))[0]:
          first_cts = struct.unpack(">i" if v1 else ">I", f.read(8)[4:])[0]
      # Hidden head: the edit starts after sample 0 is shown. Hidden tail: it ends early.
      return media_time <= first_cts and (
          segment == 0 or segment * media_scale >= (media_duration - media_time) * movie_scale)
  except (OSError, struct.error, TypeError, IndexError):
    return False


def _refs_container(path: str) -> bool:
  """Containers whose packets carry presentation timestamps and hide no frames: ISO BMFF (per
  `_mp4_shows_every_sample`) and Matroska/WebM. AVI, for one, times B-frame streams by decode
  order, so display indices cannot be ranked from its timestamps."""
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  if head[4:8] == b"ftyp":
    return _mp4_shows_every_sample(path)
  return head[:4] == b"\x1a\x45\xdf\xa3"  # EBML: Matroska / WebM


def _h264_access_unit(data: bytes) -> tuple[bool, int, bool, bool]:
  """(is_non_reference, temporal id, is_idr, has_slices) of one Annex-B H.264 access unit.

  A picture whose slices all have nal_ref_idc == 0 is, by the standard's definition, used by no
  other picture; parameter sets make the packet count as a reference, so it is never dropped.
  H.264 has no temporal layers: the temporal id is 0.
  """
  ref = idr = slices = False
  for unit in _annexb_units(data):
    kind = unit[0] & 0x1F
    ref |= (unit[0] >> 5) & 3 != 0 or kind in (7, 8)
    idr |= kind == 5
    slices |= 1 <= kind <= 5
  return not ref, 0, idr, slices


def _hevc_access_unit(data: bytes) -> tuple[bool, int, bool, bool]:
  """(is_non_reference, temporal id, is_idr, has_slices) of one Annex-B HEVC access unit.

  Non-reference: every slice is a sub-layer non-reference picture (TRAIL_N, TSA_N, STSA_N, RADL_N,
  RASL_N, RSV_VCL_N10/12/14), which no picture of its own or a lower temporal layer uses; pictures
  of higher layers may, which `_plan_refs` checks. VPS/SPS/PPS make the packet a reference.
  """
  non_ref, idr, slices, tid = True, False, False, 0
  for unit in _annexb_units(data):
    kind = (unit[0] >> 1) & 0x3F
    if kind < 32 and len(unit) > 1:
      slices = True
      tid = max(tid, (unit[1] & 7) - 1)
      non_ref &= kind <= 14 and kind % 2 == 0
      idr |= kind in (19, 20)
    elif kind in (32, 33, 34):
      non_ref = False
  return non_ref and slices, tid, idr, slices


# Streams `_plan_refs` can plan, by the FourCC OpenCV reports: their access-unit parsers. OpenCV's raw
# mode hands out Annex-B packets (start codes, parameter sets in band) for both.
REFS_CODECS = {**{f: _h264_access_unit for f in H264_FOURCCS},
               **{f: _hevc_access_unit for f in HEVC_FOURCCS}}


@dataclasses.dataclass(frozen=True)
class _RefsPlan:
  """packets: to decode, in decode order; output: the display index of each frame they decode to, in
  output order; periods: where each planned IDR period starts in both (a period's packets decode to
  as many frames, so the indices agree), each an independent stream from its IDR on."""
  packets: list[bytes]
  output: list[int]
  periods: list[int]


def _plan_refs(path: str, wanted: np.ndarray, access_unit=_h264_access_unit,
               cheaper_only: bool = False) -> _RefsPlan | None:
  """The packets the ascending frame indices `wanted` of an H.264 or HEVC stream need, from one demux
  pass (`access_unit`: the codec's parser, see REFS_CODECS).

  The stream is cut into IDR periods (no picture references across an IDR): periods holding no
  wanted frame are skipped whole; in the others only the reference pictures up to the last
  wanted one (in decode order) and the wanted pictures are kept (an HEVC sub-layer non-reference
  picture counts as a reference when the period has pictures of a higher temporal layer).
  Display indices are the packets' timestamps ranked within each period. Returns the plan, or
  None where it cannot be trusted (no IDR first, a packet without a picture, repeated or missing
  timestamps, fewer frames than wanted, a period over REFS_MAX_HELD_BYTES): the caller then
  decodes the plain way.

  cheaper_only: also None when the plan decodes more pictures than seeking / grabbing would (an
  open-GOP stream has IDRs only where the encoder was forced to, so one period may span the
  video, while seeks restart at any keyframe), and gives up demuxing once a period grows past
  REFS_MAX_PERIOD_PACKETS.
  """
  cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
  try:
    if not cap.isOpened():
      return None
    last = int(wanted[-1])
    packets: list[bytes] = []
    output: list[int] = []
    periods: list[int] = []
    hits: list[tuple[int, int, int]] = []  # wanted (display index, decode index, its keyframe's)
    # (pts, is_non_reference, temporal id, data, decode index, that of the last container keyframe)
    period: list[tuple[int, bool, int, bytes, int, int]] = []
    held = offset = 0  # offset: display frames in earlier periods
    position = keyframe = 0

    def close() -> bool:
      nonlocal offset
      pts = np.array([p[0] for p in period], np.int64)
      if len(np.unique(pts)) != len(pts):
        return False
      index = np.empty(len(pts), np.int64)
      index[np.argsort(pts)] = offset + np.arange(len(pts))
      hit = np.isin(index, wanted)
      if hit.any():
        end = int(np.nonzero(hit)[0][-1]) + 1
        top = max(p[2] for p in period)
        dropped = np.array([p[1] and p[2] >= top for p in period[:end]])
        keep = np.nonzero(~dropped | hit[:end])[0]
        periods.append(len(packets))
        packets.extend(period[k][3] for k in keep)
        output.extend(np.sort(index[keep]).tolist())
        hits.extend((int(index[k]), period[k][4], period[k][5]) for k in np.nonzero(hit)[0])
      offset += len(pts)
      return True

    while True:
      ok, packet = cap.read()
      if not ok or packet is None:
        break
      data = packet.tobytes()
      non_ref, tid, idr, slices = access_unit(data)
      if not slices or (not period and not packets and not idr):
        return None  # the plain decode drops or conceals pictures before the first IDR
      if idr and period:
        if not close():
          return None
        period, held = [], 0
        if offset > last:
          break
      pts = cap.get(cv2.CAP_PROP_PTS)
      if not math.isfinite(pts):
        return None
      if cap.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME) > 0:
        keyframe = position
      period.append((int(round(pts)), non_ref, tid, data, position, keyframe))
      position += 1
      held += len(data)
      if held > REFS_MAX_HELD_BYTES or (cheaper_only and len(period) > REFS_MAX_PERIOD_PACKETS):
        return None
    if period and not close():
      return None
    if offset <= last:
      return None  # fewer frames than wanted: the plain path reports what really decodes
    if cheaper_only:
      # Pictures the seek / grab path decodes: per wanted frame, grabbing through the gap from the
      # previous one or seeking (decoding from its keyframe), whichever is less.
      plain, previous = 0, -1
      for index, decoded, key in sorted(hits):
        plain += min(index - previous, decoded - key + 1)
        previous = index
      if len(packets) > plain:
        return None
    return _RefsPlan(packets, output, periods)
  finally:
    cap.release()


def _read_refs(path: str, cap: cv2.VideoCapture, wanted: np.ndarray, access_unit,
               cheaper_only: bool) -> list[np.ndarray] | None:
  """Decode the ascending frames `wanted` (BGR) of an H.264 / HEVC stream from `_plan_refs`'s
  packets, as a raw stream from memory; None where this does not apply.

  `cap` is the caller's fresh capture: its frame 0 is read here and compared with the planned
  decode's (a check that the raw stream decodes and converts as the container does); when None is
  returned the capture is back at frame 0.
  """
  if not _refs_container(path):
    return None
  ok, first = cap.read()
  frames = _decode_plan(path, first, wanted, access_unit, cheaper_only) if ok and first is not None else None
  if frames is None:
    cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
  return frames


def _decode_plan(path: str, first: np.ndarray, wanted: np.ndarray, access_unit,
                 cheaper_only: bool) -> list[np.ndarray] | None:
  """`_read_refs` once the plain decode's frame 0 (`first`) is known."""
  checked = np.union1d(wanted, [0])
  plan = _plan_refs(path, checked, access_unit, cheaper_only)
  if plan is None:
    return None
  # Periods are independent streams: up to cv2.getNumThreads() decoders (REFS_MAX_DECODERS at most)
  # each take a run of them, one FFmpeg thread each; one decoder keeps FFmpeg's own threading.
  decoders = min(len(plan.periods), max(1, cv2.getNumThreads()), REFS_MAX_DECODERS)
  total = len(plan.packets)
  cuts = sorted({min(plan.periods, key=lambda p: abs(p - total * k / decoders)) for k in range(decoders)})
  bounds = list(zip([0] + cuts[1:], cuts[1:] + [total]))
  targets = set(checked.tolist())
  if len(bounds) == 1:
    parts = [_decode_packets(plan.packets, plan.output, targets, threads=0)]
  else:
    with concurrent.futures.ThreadPoolExecutor(len(bounds)) as pool:
      parts = list(pool.map(lambda b: _decode_packets(plan.packets[b[0]:b[1]], plan.output[b[0]:b[1]],
                                                      targets, threads=1), bounds))
  if any(part is None for part in parts):
    return None
  frames = [frame for part in parts for frame in part]
  if len(frames) != len(checked) or not np.array_equal(frames[0], first):
    return None  # frame 0 differs from the plain decode's: do not trust the rest
  return frames if wanted[0] == 0 else frames[1:]


def _decode_packets(packets: list[bytes], output: list[int], targets: set[int],
                    threads: int) -> list[np.ndarray] | None:
  """Decode Annex-B `packets` (starting at an IDR) from memory; the frames whose display index
  (`output`, one per decoded frame) is in `targets`, BGR. None if the count of frames is off."""
  # OpenCV does not hold a reference to the stream object: keep it alive until release().
  stream = io.BytesIO(b"".join(packets))
  sub = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads] if threads else [])
  try:
    if not sub.isOpened():
      return None
    frames = []
    for index in output:
      if not sub.grab():
        return None
      if index in targets:
        ok, frame = sub.retrieve()
        if not ok or frame is None:
          return None
        frames.append(frame)
    return None if sub.grab() else frames  # more frames than packets kept: the mapping is off
  finally:
    sub.release()
    stream.close()


def _read_indices(cap: cv2.VideoCapture, wanted: np.ndarray,
                  strategy: DecodeStrategy) -> tuple[list[np.ndarray], int]:
  """Decode the ascending unique frames `wanted`; stops at the first failed read.

  Returns (BGR frames decoded, in order; index of the last frame that decoded or -1).
  """
  model = _SeekCostModel(SEEK_MIN_GAP)
  frames: list[np.ndarray] = []
  pos = 0  # index of the frame the next grab() returns (a fresh capture starts at 0)
  last_good = -1
  wanted_list = wanted.tolist()
  for k, idx in enumerate(wanted_list):
    gap = idx - pos
    seek = gap != 0 and (strategy == "seek" or gap < 0 or
                         (strategy == "auto" and model.should_seek(gap)))
    t0 = time.perf_counter()
    if seek:
      cap.set(cv2.CAP_PROP_POS_FRAMES, idx)
    else:
      grabbed = 0
      while grabbed < gap and cap.grab():
        grabbed += 1
      if grabbed < gap:
        break
      if gap:
        model.observe("grab_s", (time.perf_counter() - t0) / gap)
    ok, frame = cap.read()
    if not ok or frame is None:
      break
    if seek:
      # Past the real end of a truncated stream a seek "succeeds" with some other frame; the
      # position then disagrees with the target, so treat it as a failed read.
      if int(cap.get(cv2.CAP_PROP_POS_FRAMES)) != idx + 1:
        break
      model.observe("seek_s", time.perf_counter() - t0)
    frames.append(frame)
    last_good = idx
    pos = idx + 1
    if strategy == "auto" and model.grab_s is None and k + 1 < len(wanted_list) and \
        wanted_list[k + 1] > idx + 1:
      # One probe grab (a single frame's decode) so the model can compare costs from now on.
      t0 = time.perf_counter()
      if cap.grab():
        model.observe("grab_s", time.perf_counter() - t0)
        pos += 1
  return frames, last_good


def decode_frames(path: str | os.PathLike, indices, *, strategy: DecodeStrategy = "auto",
                  _cap=None, _info=None) -> np.ndarray:
  """Decode frames `indices` (any order, repeats allowed) -> uint8 RGB `[len(indices), H, W, 3]`.

  strategy: "seek" sets CAP_PROP_POS_FRAMES for every frame, "grab" decodes forward through
  every gap, "refs" (H.264, HEVC) decodes just the pictures the wanted frames depend on (see
  `_plan_refs`), "auto" uses "refs" where it applies and decodes fewer pictures, and
  otherwise picks seek or grab per gap from measured costs (see `_SeekCostModel`).
  Raises VideoError subclasses; TruncatedVideoError (with `.decodable_frames`) when an index lies
  past the frames that really decode.
  """
  indices = np.asarray(indices, np.int64).reshape(-1)
  cap, info = (_cap, _info) if _cap is not None else _open(path)
  try:
    if indices.size == 0:
      raise ValueError(f"{info.path}: decode_frames needs at least one index")
    if indices.min() < 0:
      raise ValueError(f"{info.path}: negative frame index {int(indices.min())}")
    wanted, inverse = np.unique(indices, return_inverse=True)
    if info.fourcc in H264_FOURCCS and _h264_interlaced(info.path, cap):
      raise UnsupportedCodecError(
          info.path, "interlaced H.264 (field-coded pictures): OpenCV's FFmpeg build cannot convert "
          "its frames to BGR (it returns garbage without an error); deinterlace it first (e.g. "
          "ffmpeg -vf bwdif)")
    frames = None
    if strategy in ("auto", "refs") and info.fourcc in REFS_CODECS:
      frames = _read_refs(info.path, cap, wanted, REFS_CODECS[info.fourcc], cheaper_only=strategy == "auto")
    if frames is not None:
      last_good = int(wanted[-1])
    elif strategy == "refs":
      raise ValueError(f"{info.path}: strategy 'refs' does not apply (codec {info.fourcc}): it "
                       "needs H.264 or HEVC in MP4/MOV or Matroska that starts with an IDR, hides no "
                       "frames and decodes from a raw stream as from its container")
    else:
      frames, last_good = _read_indices(cap, wanted, strategy)
  finally:
    if _cap is None:
      cap.release()
  if len(frames) < len(wanted):
    if last_good < 0 and wanted[0] == 0:
      raise _no_frames_error(info)
    real = _count_decodable(info.path, info, last_good)
    if real == 0:
      raise _no_frames_error(info)
    missing = int(wanted[len(frames)])
    if missing >= info.total_frames > 0 and real == info.total_frames:
      reason = f"frame {missing} is past the end ({real} frames)"
    else:
      reason = (f"frame {missing} does not decode: only {real} of the {info.total_frames} "
                "frames the container reports are decodable (truncated file?)")
    raise TruncatedVideoError(info.path, reason, decodable_frames=real)
  shapes = {f.shape for f in frames}
  if len(shapes) != 1:
    raise CorruptVideoError(info.path, f"frames change size mid-stream: {sorted(shapes)}")
  bgr = np.stack(frames)[inverse]
  return bgr[..., ::-1].copy()  # BGR -> RGB


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VideoFrames:
  """One sampled, resized, normalised video ready for the vision tower.

  pixel_values: float32 `[gt*gh*gw, 3*tp*14*14]` in Qwen's patch order (not window order).
  grid_thw: int64 `[3]` = (gt, gh, gw) in patches.
  frame_indices: int64 `[n]` decoded frame indices; timestamps: float64 `[n]` seconds.
  total_frames: frames the video really has (the container's count unless it over-reported).
  sampled_fps: n / window_frames * video_fps; second_per_grid = temporal_patch_size / sampled_fps
  (M-RoPE temporal spacing). frames_uint8: resized uint8 `[n, h, w, 3]` RGB if requested.
  """
  pixel_values: np.ndarray
  grid_thw: np.ndarray
  frame_indices: np.ndarray
  timestamps: np.ndarray
  video_fps: float
  total_frames: int
  sampled_fps: float
  second_per_grid: float
  path: str
  frames_uint8: np.ndarray | None = None


def load_video(path: str | os.PathLike, sampling: VideoSampling = VideoSampling(), *,
               keep_uint8: bool = False,
               on_truncated: Literal["resample", "raise"] = "resample") -> VideoFrames:
  """Decode, sample, resize, normalise and patchify one video as qwen-vl-utils + HF would.

  on_truncated: when the container over-reports its frame count (reads fail before the end),
  "resample" re-samples the indices over the frames that really decode; "raise" raises
  TruncatedVideoError. Both raise when too few frames decode for the requested nframes.
  """
  path = os.fspath(path)
  cap, info = _open(path)
  try:
    total = info.total_frames
    if total <= 0:  # some containers store no count: count by decoding (rare, slow path)
      total = _count_decodable(path, info, -1)
      if total == 0:
        raise _no_frames_error(info)
    for attempt in range(2):
      try:
        indices = sample_frame_indices(total, info.fps, sampling)
      except ValueError as e:
        raise TruncatedVideoError(path, f"cannot sample this video: {e}",
                                  decodable_frames=total) from None
      try:
        rgb = decode_frames(path, indices, strategy=sampling.decode, _cap=cap, _info=info)
        break
      except TruncatedVideoError as e:
        if on_truncated == "raise" or attempt == 1 or e.decodable_frames in (None, total):
          raise
        total = e.decodable_frames
        cap.release()  # failed reads leave the decoder at an unknown position: start afresh
        cap, info = _open(path)
  finally:
    cap.release()
  n = len(indices)
  _, _, window = frame_window(total, info.fps, sampling.start, sampling.end)
  h, w = video_resize_dims(rgb.shape[1], rgb.shape[2], n, sampling)
  resized = resize_frames(rgb, h, w, sampling.resize)
  pixels, grid_thw = pixel_values(resized, sampling.temporal_patch_size, sampling.patch_size,
                                  sampling.merge_size)
  sampled_fps = n / window * info.fps
  return VideoFrames(
      pixel_values=pixels, grid_thw=grid_thw, frame_indices=indices,
      timestamps=indices / info.fps, video_fps=info.fps, total_frames=total,
      sampled_fps=sampled_fps, second_per_grid=sampling.temporal_patch_size / sampled_fps,
      path=path, frames_uint8=resized if keep_uint8 else None)


@dataclasses.dataclass(frozen=True)
class ImageFrames:
  """One image for the vision tower: pixel_values `[gh*gw, 1176]`, grid_thw (1, gh, gw)."""
  pixel_values: np.ndarray
  grid_thw: np.ndarray
  path: str


def load_image(path: str | os.PathLike, min_pixels: int = IMAGE_MIN_PIXELS,
               max_pixels: int = IMAGE_MAX_PIXELS, *, patch_size: int = 14,
               merge_size: int = 2, temporal_patch_size: int = 2,
               resize: ResizeMethod = "exact") -> ImageFrames:
  """Load an image file as the HF Qwen2-VL image processor does (the frame is repeated over the
  temporal patch, so grid_t = 1). Alpha is dropped. Raises ImageError."""
  path = os.fspath(path)
  _check_file(path, ImageError)
  bgr = cv2.imread(path, cv2.IMREAD_COLOR)
  if bgr is None:
    raise ImageError(path, "OpenCV cannot decode the image (corrupt or unsupported format)")
  rgb = bgr[None, ..., ::-1]
  try:
    h, w = smart_resize(rgb.shape[1], rgb.shape[2], patch_size * merge_size, min_pixels, max_pixels)
  except ValueError as e:
    raise ImageError(path, str(e)) from None
  resized = resize_frames(np.ascontiguousarray(rgb), h, w, resize)
  pixels, grid_thw = pixel_values(resized, temporal_patch_size, patch_size, merge_size)
  return ImageFrames(pixel_values=pixels, grid_thw=grid_thw, path=path)
