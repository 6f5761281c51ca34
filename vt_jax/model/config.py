"""Qwen2.5-VL configuration: dataclasses, presets, and the hub's flat `config.json` in both directions.

The hub's `config.json` for Qwen2.5-VL is "flat": text fields at the top level, the vision tower under
`vision_config`, M-RoPE under `rope_scaling`. transformers 5.x writes a nested form (`text_config`); we read
both and always write the flat form, which transformers 4.x and 5.x both load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
MODEL_TYPE = "qwen2_5_vl"


class ConfigError(ValueError):
  """A configuration is invalid: the message names the source (file), the field and what to do."""


class NotQwen25VLError(ConfigError):
  """A directory or config dict is not a Qwen2.5-VL checkpoint."""


def _where(source: str | None) -> str:
  return f"{source}: " if source else ""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The vision tower (a ViT with window attention and a 2x2 patch merger)."""
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112  # pixels
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  hidden_act: str = "silu"
  tokens_per_second: float = 2.0
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened patch vector: C * T * P * P (1176 for the released models)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size * self.spatial_merge_size

  @property
  def window_patches(self) -> int:
    """Patches per attention window (64 for window_size 112, 16 for 56)."""
    side = self.window_size // self.spatial_merge_size // self.patch_size
    return side * side * self.merge_unit

  def validate(self, source: str | None = None) -> None:
    w = _where(source)
    for name in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                 "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"{w}vision_config.{name} must be positive, got {getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"{w}vision_config.hidden_size={self.hidden_size} is not divisible by "
                        f"num_heads={self.num_heads}")
    if self.head_dim % 4:
      raise ConfigError(f"{w}vision head_dim={self.head_dim} must be a multiple of 4 (2D rotary over h and w)")
    unit = self.patch_size * self.spatial_merge_size
    if self.window_size % unit:
      raise ConfigError(f"{w}vision_config.window_size={self.window_size} must be a multiple of "
                        f"patch_size * spatial_merge_size = {unit}")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ConfigError(f"{w}vision_config.fullatt_block_indexes {bad} out of range for depth={self.depth}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(f"{w}vision_config.hidden_act={self.hidden_act!r} not supported ({sorted(_ACTIVATIONS)})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The Qwen2 text decoder with M-RoPE."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  def validate(self, source: str | None = None) -> None:
    w = _where(source)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads"):
      if int(getattr(self, name)) <= 0:
        raise ConfigError(f"{w}{name} must be positive, got {getattr(self, name)}")
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"{w}hidden_size={self.hidden_size} is not divisible by "
                        f"num_attention_heads={self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"{w}num_attention_heads={self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads={self.num_key_value_heads}")
    if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
      raise ConfigError(f"{w}rope_scaling.mrope_section={list(self.mrope_section)} must have 3 entries summing "
                        f"to head_dim/2 = {self.head_dim // 2}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ConfigError(f"{w}hidden_act={self.hidden_act!r} not supported ({sorted(_ACTIVATIONS)})")


_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2.5-VL: text decoder + vision tower + special token ids.

  Token ids default to Qwen2.5's tokenizer; tiny test/demo models pass their own
  (`dataclasses.replace(config, image_token_id=...)`).
  """
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  vision_token_id: int = 151654  # <|vision_pad|>: unused by the model, kept for the round trip
  bos_token_id: int = 151643
  eos_token_ids: tuple[int, ...] = (151645, 151643)  # <|im_end|> ends a chat turn; <|endoftext|> a document
  pad_token_id: int = 151643

  def __post_init__(self):
    object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
    object.__setattr__(self, "vision", dataclasses.replace(
        self.vision, fullatt_block_indexes=tuple(int(i) for i in self.vision.fullatt_block_indexes)))
    object.__setattr__(self, "text", dataclasses.replace(
        self.text, mrope_section=tuple(int(i) for i in self.text.mrope_section)))

  def validate(self, source: str | None = None) -> "ModelConfig":
    """Checks sizes and ids for consistency; returns self. Raises ConfigError naming the field."""
    self.text.validate(source)
    self.vision.validate(source)
    w = _where(source)
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ConfigError(f"{w}vision_config.out_hidden_size={self.vision.out_hidden_size} must equal the text "
                        f"hidden_size={self.text.hidden_size} (merged vision tokens replace text embeddings)")
    ids = dict(image_token_id=self.image_token_id, video_token_id=self.video_token_id,
               vision_start_token_id=self.vision_start_token_id, vision_end_token_id=self.vision_end_token_id,
               bos_token_id=self.bos_token_id,
               pad_token_id=self.pad_token_id)
    ids.update({f"eos_token_ids[{i}]": e for i, e in enumerate(self.eos_token_ids)})
    for name, value in ids.items():
      if not 0 <= value < self.text.vocab_size:
        raise ConfigError(f"{w}{name}={value} is outside the vocabulary (vocab_size={self.text.vocab_size}); "
                          f"set the special token ids of your tokenizer")
    if self.image_token_id == self.video_token_id:
      raise ConfigError(f"{w}image_token_id and video_token_id must differ (both {self.image_token_id})")
    if not self.eos_token_ids:
      raise ConfigError(f"{w}eos_token_ids must not be empty")
    return self

  # ---- hub config.json -------------------------------------------------------------------------------

  def to_hf_dict(self, *, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The flat hub-style config.json dict (what the released checkpoints carry)."""
    t, v = self.text, self.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": t.max_position_embeddings,
        "max_window_layers": t.num_hidden_layers,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_ids[0],
        "pad_token_id": self.pad_token_id,
        "image_token_id": self.image_token_id,
        "video_token_id": self.video_token_id,
        "vision_start_token_id": self.vision_start_token_id,
        "vision_end_token_id": self.vision_end_token_id,
        "vision_token_id": self.vision_token_id,
        "torch_dtype": torch_dtype,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "in_chans": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "out_hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            "tokens_per_second": _plain_number(v.tokens_per_second),
        },
    }

  @classmethod
  def from_hf_dict(cls, cfg: Mapping[str, Any], source: str | None = None) -> "ModelConfig":
    """Reads a hub config dict, flat (released checkpoints) or nested (transformers 5.x `text_config`).

    Raises:
      NotQwen25VLError: model_type is not qwen2_5_vl.
      ConfigError: a required field is missing or sizes are inconsistent.
    """
    w = _where(source)
    model_type = cfg.get("model_type")
    if model_type != MODEL_TYPE:
      raise NotQwen25VLError(f"{w}model_type={model_type!r}, expected {MODEL_TYPE!r}: not a Qwen2.5-VL checkpoint")
    text_src = dict(cfg)
    if isinstance(cfg.get("text_config"), Mapping):
      text_src.update({k: x for k, x in cfg["text_config"].items() if x is not None})
    vis = cfg.get("vision_config")
    if not isinstance(vis, Mapping):
      raise ConfigError(f"{w}missing vision_config")

    def need(src, key, where_name):
      if key not in src or src[key] is None:
        raise ConfigError(f"{w}missing field {where_name}{key}")
      return src[key]

    rope = text_src.get("rope_scaling") or text_src.get("rope_parameters") or {}
    section = rope.get("mrope_section")
    if section is None:
      raise ConfigError(f"{w}missing rope_scaling.mrope_section (M-RoPE sections)")
    theta = text_src.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    num_heads = int(need(text_src, "num_attention_heads", ""))
    text = TextConfig(
        vocab_size=int(need(text_src, "vocab_size", "")),
        hidden_size=int(need(text_src, "hidden_size", "")),
        intermediate_size=int(need(text_src, "intermediate_size", "")),
        num_hidden_layers=int(need(text_src, "num_hidden_layers", "")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(text_src.get("num_key_value_heads") or num_heads),
        rope_theta=float(theta),
        rms_norm_eps=float(text_src.get("rms_norm_eps", 1e-6)),
        mrope_section=tuple(int(s) for s in section),
        max_position_embeddings=int(text_src.get("max_position_embeddings", 128000)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text_src.get("tie_word_embeddings", False))),
        hidden_act=str(text_src.get("hidden_act", "silu")),
    )
    vrope = vis.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=int(need(vis, "depth", "vision_config.")),
        hidden_size=int(need(vis, "hidden_size", "vision_config.")),
        intermediate_size=int(need(vis, "intermediate_size", "vision_config.")),
        num_heads=int(need(vis, "num_heads", "vision_config.")),
        in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
        patch_size=int(vis.get("patch_size", vis.get("spatial_patch_size", 14))),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=int(need(vis, "out_hidden_size", "vision_config.")),
        hidden_act=str(vis.get("hidden_act", "silu")),
        tokens_per_second=float(vis.get("tokens_per_second", 2)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    defaults = cls()
    eos = text_src.get("eos_token_id", defaults.eos_token_ids)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
    bos = text_src.get("bos_token_id")
    pad = text_src.get("pad_token_id")
    config = cls(
        text=text, vision=vision,
        image_token_id=int(cfg.get("image_token_id", defaults.image_token_id)),
        video_token_id=int(cfg.get("video_token_id", defaults.video_token_id)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", defaults.vision_start_token_id)),
        vision_end_token_id=int(cfg.get("vision_end_token_id", defaults.vision_end_token_id)),
        vision_token_id=int(cfg.get("vision_token_id", defaults.vision_token_id)),
        bos_token_id=int(bos if bos is not None else defaults.bos_token_id),
        eos_token_ids=eos,
        pad_token_id=int(pad if pad is not None else (bos if bos is not None else defaults.pad_token_id)),
    )
    return config.validate(source)


def _plain_number(x: float):
  return int(x) if float(x).is_integer() else float(x)


def load_config(path: str | os.PathLike) -> ModelConfig:
  """Reads `config.json` from a checkpoint directory (or the file itself); eos ids from a
  `generation_config.json` beside it when present (chat checkpoints stop on several ids)."""
  path = os.fspath(path)
  file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else path
  if not os.path.exists(file):
    raise NotQwen25VLError(f"{path}: no {CONFIG_NAME}; not a Hugging Face checkpoint directory")
  cfg = _read_json(file)
  config = ModelConfig.from_hf_dict(cfg, source=file)
  gen_file = os.path.join(os.path.dirname(file), GENERATION_CONFIG_NAME)
  if os.path.exists(gen_file):
    eos = _read_json(gen_file).get("eos_token_id")
    if eos is not None:
      eos = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
      config = dataclasses.replace(config, eos_token_ids=eos).validate(gen_file)
  return config


def _read_json(file: str) -> dict:
  try:
    with open(file) as f:
      cfg = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: invalid JSON ({e})") from e
  if not isinstance(cfg, dict):
    raise ConfigError(f"{file}: expected a JSON object")
  return cfg


def save_config(config: ModelConfig, path: str | os.PathLike, *, torch_dtype: str = "bfloat16") -> str:
  """Writes the flat hub-style config.json and generation_config.json into directory `path`; returns the
  config.json path."""
  os.makedirs(path, exist_ok=True)
  file = os.path.join(os.fspath(path), CONFIG_NAME)
  with open(file, "w") as f:
    json.dump(config.to_hf_dict(torch_dtype=torch_dtype), f, indent=2)
    f.write("\n")
  with open(os.path.join(os.fspath(path), GENERATION_CONFIG_NAME), "w") as f:
    json.dump(generation_config_dict(config), f, indent=2)
    f.write("\n")
  return file


def generation_config_dict(config: ModelConfig) -> dict[str, Any]:
  """generation_config.json contents (greedy by default; samplers set their own temperature)."""
  return {
      "bos_token_id": config.bos_token_id,
      "eos_token_id": list(config.eos_token_ids),
      "pad_token_id": config.pad_token_id,
      "do_sample": False,
  }


# ---- presets ---------------------------------------------------------------------------------------------

def _released(hidden, intermediate, layers, heads, kv_heads, vocab, tied) -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tied),
      vision=VisionConfig(out_hidden_size=hidden),
  )


# Token ids of the tiny preset (vocab 1000): the Qwen specials, moved to the top of the small vocabulary.
TINY_TOKEN_IDS = dict(bos_token_id=990, pad_token_id=990, eos_token_ids=(992, 990), vision_start_token_id=993,
                      vision_end_token_id=994, vision_token_id=995, image_token_id=996, video_token_id=997)

PRESETS: dict[str, ModelConfig] = {
    "3b": _released(2048, 11008, 36, 16, 2, 151936, True),
    "7b": _released(3584, 18944, 28, 28, 4, 152064, False),
    "32b": _released(5120, 27648, 64, 40, 8, 152064, False),
    "72b": _released(8192, 29568, 80, 64, 8, 152064, False),
    # Unit tests and the demo: runs in well under a second on CPU.
    "tiny": ModelConfig(
        text=TextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        max_position_embeddings=4096),
        vision=VisionConfig(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                            fullatt_block_indexes=(1, 3), window_size=56, out_hidden_size=64),
        **TINY_TOKEN_IDS,
    ),
    # Benchmarks: hidden 512 / 8 layers with the real Qwen vocabulary and token ids.
    "small": ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=2, mrope_section=(8, 12, 12),
                        tie_word_embeddings=True),
        vision=VisionConfig(depth=8, hidden_size=256, intermediate_size=512, num_heads=4,
                            fullatt_block_indexes=(3, 7), out_hidden_size=512),
    ),
}


def get_config(name: str, **token_ids: Any) -> ModelConfig:
  """A preset by name ("3b", "7b", "32b", "72b", "tiny", "small"), optionally with other token ids."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **token_ids).validate(f"preset {name}")


def replace_sizes(config: ModelConfig, *, text: Mapping[str, Any] | None = None,
                  vision: Mapping[str, Any] | None = None, **fields: Any) -> ModelConfig:
  """A copy with some text/vision/top-level fields changed, validated."""
  return dataclasses.replace(
      config,
      text=dataclasses.replace(config.text, **(text or {})),
      vision=dataclasses.replace(config.vision, **(vision or {})),
      **fields,
  ).validate()
