"""Model outputs: dataclasses that are JAX pytrees (they pass through ``jit``) and serialise to JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import numpy as np

from gemma3.cache import KVCache

_SERIALISABLE: dict[str, type] = {"KVCache": KVCache}


class ModelOutput:
    """Mixin of the output classes: dict/JSON round trips and functional ``replace``."""

    def to_dict(self) -> dict[str, Any]:
        """Fields that are set (not None), by name; values are kept as they are."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """JSON text; arrays become ``{"__array__": [...], "dtype": ..., "shape": [...]}``."""
        return json.dumps(_encode(self.to_dict()))

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(_decode(json.loads(text)))

    def __getitem__(self, name: str):
        return getattr(self, name)


def _encode(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(x)
        data = a.tolist() if a.dtype.kind in "biu" else a.astype(np.float64).tolist()  # exact for f32/bf16
        return {"__array__": data, "dtype": str(a.dtype), "shape": list(a.shape)}
    if dataclasses.is_dataclass(x) and type(x).__name__ in _SERIALISABLE:
        return {"__dataclass__": type(x).__name__,
                "fields": {f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return {"__tuple__": [_encode(v) for v in x]} if isinstance(x, tuple) else [_encode(v) for v in x]
    return x


def _decode(x):
    if isinstance(x, dict):
        if "__array__" in x:
            return jax.numpy.asarray(np.asarray(x["__array__"], dtype=jax.numpy.dtype(x["dtype"])).reshape(x["shape"]))
        if "__dataclass__" in x:
            return _SERIALISABLE[x["__dataclass__"]](**{k: _decode(v) for k, v in x["fields"].items()})
        if "__tuple__" in x:
            return tuple(_decode(v) for v in x["__tuple__"])
        return {k: _decode(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decode(v) for v in x]
    return x


def output_class(cls):
    """Make ``cls`` a dataclass registered as a pytree, with every field a child."""
    cls = dataclasses.dataclass(cls)
    return jax.tree_util.register_dataclass(cls)


@output_class
class Gemma3ModelOutputWithPast(ModelOutput):
    last_hidden_state: jax.Array | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


@output_class
class Gemma3CausalLMOutputWithPast(ModelOutput):
    loss: jax.Array | None = None
    logits: jax.Array | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None


@output_class
class Gemma3SequenceClassifierOutputWithPast(ModelOutput):
    loss: jax.Array | None = None
    logits: jax.Array | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
