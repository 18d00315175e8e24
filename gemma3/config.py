"""Model configurations, read from Hugging Face ``config.json`` files with their own field names.

Two styles exist in the wild and both load: the published checkpoints (``rope_theta``,
``rope_local_base_freq``, ``rope_scaling``, ``sliding_window_pattern``, ``torch_dtype``; sparse files
that rely on the defaults) and what transformers 5.x writes (``rope_parameters``, ``layer_types``,
``dtype``). Whatever the input style, the config keeps one normal form: explicit ``layer_types`` and
per-layer-type ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)
SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear")

class ConfigError(ValueError):
    """A config.json that this library cannot honour, with the field at fault named."""


@dataclasses.dataclass(eq=False)  # hashed by identity: models keep it as static jit metadata
class Gemma3TextConfig:
    """The Gemma 3 text decoder's hyper-parameters, with transformers' defaults for absent keys."""

    vocab_size: int = 262_208
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 131_072
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    layer_types: list[str] | None = None
    rope_parameters: dict[str, dict[str, Any]] | None = None
    final_logit_softcapping: float | None = None
    # Stored by the checkpoints but unused by Gemma 3 (Q/K-norm replaced it); transformers ignores it too.
    attn_logit_softcapping: float | None = None
    num_labels: int = 2
    torch_dtype: str | None = None

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma3TextConfig:
        d = dict(d)
        if "text_config" in d:  # a multimodal config.json: its text half
            d = dict(d["text_config"] or {}) | {"tie_word_embeddings": d.get("tie_word_embeddings", True)}
        if d.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention=True (EmbeddingGemma) is not supported")
        pattern = d.pop("sliding_window_pattern", 6)
        n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
        if d.get("layer_types") is None:
            if not isinstance(pattern, int) or pattern < 1:
                raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
            d["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]
        d["rope_parameters"] = _rope_parameters(d)
        if d.get("hidden_activation") is None and d.get("hidden_act"):
            d["hidden_activation"] = d["hidden_act"]
        d["num_labels"] = d.get("num_labels") or len(d.get("id2label") or {}) or 2
        d["torch_dtype"] = d.get("dtype") or d.get("torch_dtype")
        known = {f.name for f in dataclasses.fields(cls)}
        # Other keys (architectures, transformers_version, initializer_range, ...) do not change inference.
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Gemma3TextConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma3TextConfig:
        path = os.fspath(path)
        return cls.from_json_file(os.path.join(path, "config.json") if os.path.isdir(path) else path)

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
             f"num_key_value_heads ({self.num_key_value_heads})")
        need(self.hidden_activation in SUPPORTED_ACTIVATIONS,
             f"hidden_activation {self.hidden_activation!r} is not supported (Gemma 3 uses 'gelu_pytorch_tanh')")
        need(not self.attention_bias, "attention_bias=True is not supported: Gemma 3 projections have no bias")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        need(self.query_pre_attn_scalar > 0, f"query_pre_attn_scalar must be > 0, got {self.query_pre_attn_scalar!r}")
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(self.num_hidden_layers)]
        need(len(self.layer_types) == self.num_hidden_layers,
             f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not bad, f"unknown layer_types {bad}; expected {list(LAYER_TYPES)}")
        if SLIDING in self.layer_types:
            need(isinstance(self.sliding_window, int) and self.sliding_window > 0,
                 f"sliding_window must be a positive integer when sliding layers exist, got {self.sliding_window!r}")
        if self.rope_parameters is None:
            self.rope_parameters = _rope_parameters({})
        for t in LAYER_TYPES:
            p = self.rope_parameters.get(t)
            need(isinstance(p, dict), f"rope_parameters[{t!r}] is missing")
            need(p.get("rope_type", "default") in SUPPORTED_ROPE_TYPES,
                 f"rope_type {p.get('rope_type')!r} for {t} is not supported; supported: {list(SUPPORTED_ROPE_TYPES)}")
            need(isinstance(p.get("rope_theta"), (int, float)) and p["rope_theta"] > 0,
                 f"rope_parameters[{t!r}]['rope_theta'] must be > 0, got {p.get('rope_theta')!r}")
            if p.get("rope_type") == "linear":
                need(isinstance(p.get("factor"), (int, float)) and p["factor"] >= 1,
                     f"linear rope scaling for {t} needs factor >= 1, got {p.get('factor')!r}")
        if self.final_logit_softcapping is not None:
            need(self.final_logit_softcapping > 0,
                 f"final_logit_softcapping must be > 0 or null, got {self.final_logit_softcapping!r}")

    # ------------------------------------------------------------------ derived
    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def rope(self, layer_type: str) -> tuple[float, float]:
        """(base, linear scaling factor) of the RoPE used by ``layer_type`` layers."""
        p = self.rope_parameters[layer_type]
        return float(p["rope_theta"]), float(p.get("factor", 1.0)) if p.get("rope_type") == "linear" else 1.0

    def to_dict(self) -> dict[str, Any]:
        """The transformers 5.x style of config.json."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.pop("num_labels")
        d["dtype"] = d.pop("torch_dtype")
        d["model_type"] = "gemma3_text"
        d["architectures"] = ["Gemma3ForCausalLM"]
        return d

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)


def _rope_parameters(d: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Normalise either config style into ``{full_attention: {...}, sliding_attention: {...}}``."""
    given = d.get("rope_parameters")
    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"rope_parameters must be a mapping, got {given!r}")
    if given and not set(given) & set(LAYER_TYPES):  # one flat dict for all layers: applies to full layers
        given = {FULL: dict(given)}
    params = {t: dict((given or {}).get(t) or {}) for t in LAYER_TYPES}
    scaling = d.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling must be a mapping or null, got {scaling!r}")
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        params[FULL].update(scaling)
    params[FULL].setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    params[SLIDING].setdefault("rope_theta", d.get("rope_local_base_freq", 10_000.0))
    for p in params.values():
        p.setdefault("rope_type", "default")
    return params


@dataclasses.dataclass(eq=False)
class SiglipVisionConfig:
    """The SigLIP vision tower's hyper-parameters (transformers' defaults for absent keys)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                     "image_size", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"vision_config.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision_config.hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision_config.image_size ({self.image_size}) must be a multiple of "
                              f"patch_size ({self.patch_size})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SiglipVisionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {"model_type": "siglip_vision_model", "vision_use_head": False}


@dataclasses.dataclass(eq=False)
class Gemma3Config:
    """The multimodal model: text and vision configs, image tokens, and how images become tokens."""

    text_config: Gemma3TextConfig = dataclasses.field(default_factory=Gemma3TextConfig)
    vision_config: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)
    mm_tokens_per_image: int = 256
    boi_token_index: int = 255_999
    eoi_token_index: int = 256_000
    image_token_index: int = 262_144
    tie_word_embeddings: bool = True
    torch_dtype: str | None = None

    def __post_init__(self):
        side = math.isqrt(self.mm_tokens_per_image) if self.mm_tokens_per_image > 0 else 0
        if side * side != self.mm_tokens_per_image:
            raise ConfigError(f"mm_tokens_per_image must be a perfect square, got {self.mm_tokens_per_image}")
        if self.vision_config.patches_per_side % side:
            raise ConfigError(f"the {self.vision_config.patches_per_side}x{self.vision_config.patches_per_side} patch "
                              f"grid does not pool evenly into {side}x{side} image tokens")
        self.text_config.tie_word_embeddings = self.tie_word_embeddings

    @property
    def image_token_id(self) -> int:
        return self.image_token_index

    @property
    def tokens_per_side(self) -> int:
        return math.isqrt(self.mm_tokens_per_image)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Gemma3Config:
        if "text_config" not in d and "vision_config" not in d:
            raise ConfigError("not a multimodal Gemma 3 config: it has neither text_config nor vision_config")
        aliases = {"image_token_id": "image_token_index", "boi_token_id": "boi_token_index",
                   "eoi_token_id": "eoi_token_index"}
        d = {aliases.get(k, k): v for k, v in d.items()}
        tie = d.get("tie_word_embeddings", True)
        text = Gemma3TextConfig.from_dict({**(d.get("text_config") or {}), "tie_word_embeddings": tie})
        known = {f.name for f in dataclasses.fields(cls)} - {"text_config", "vision_config"}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs["torch_dtype"] = d.get("dtype") or d.get("torch_dtype")
        return cls(text_config=text, vision_config=SiglipVisionConfig.from_dict(d.get("vision_config")), **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma3Config:
        path = os.fspath(path)
        with open(os.path.join(path, "config.json") if os.path.isdir(path) else path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        text = self.text_config.to_dict()
        text.pop("architectures")
        return {
            "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": text, "vision_config": self.vision_config.to_dict(),
            "mm_tokens_per_image": self.mm_tokens_per_image, "boi_token_index": self.boi_token_index,
            "eoi_token_index": self.eoi_token_index, "image_token_index": self.image_token_index,
            "tie_word_embeddings": self.tie_word_embeddings, "dtype": self.torch_dtype,
        }
