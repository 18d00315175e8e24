"""Device meshes and partition rules: where every parameter and cache buffer lives.

The mesh has three axes: ``data`` (independent batch rows), ``fsdp`` (parameters split along their
model-width dimension and gathered per layer; batch rows split too) and ``tensor`` (Megatron-style:
heads and MLP columns split, partial sums reduced). A dimension that an axis does not divide stays
whole on that axis, so any mesh works with any model, at worst by replicating.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")

# Parameter rules, first match wins, on the dotted parameter path. Kernels are (in, out).
PARAMETER_RULES: list[tuple[str, tuple]] = [
    (r"embed_tokens\.embedding$", ("tensor", "fsdp")),  # (vocab, hidden)
    (r"self_attn\.[qkv]_proj\.kernel$", ("fsdp", "tensor")),  # heads split over tensor
    (r"self_attn\.(o|out)_proj\.kernel$", ("tensor", "fsdp")),  # text o_proj, SigLIP out_proj
    (r"mlp\.(gate|up)_proj\.kernel$", ("fsdp", "tensor")),
    (r"mlp\.down_proj\.kernel$", ("tensor", "fsdp")),
    (r"mlp\.fc1\.kernel$", ("fsdp", "tensor")),  # SigLIP MLP
    (r"mlp\.fc2\.kernel$", ("tensor", "fsdp")),
    (r"mm_input_projection_weight$", (None, "tensor")),  # (vision width, text width)
    (r"lm_head\.kernel$", ("fsdp", "tensor")),  # (hidden, vocab)
    (r"score\.kernel$", ("fsdp", None)),
    (r".*", ()),  # norms and anything else: replicated
]


def create_mesh(data: int = 1, fsdp: int = 1, tensor: int = -1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def _fit(spec: tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The spec with every axis that does not divide its dimension dropped."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def parameter_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, spec in PARAMETER_RULES:
        if re.search(pattern, path):
            return _fit(spec, shape, mesh)
    raise AssertionError("the last rule matches everything")


def parameter_sharding(path: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, parameter_spec(path, shape, mesh))


def shard_model(model, mesh: Mesh):
    """Place every parameter of an NNX model by the rules (in place) and return the model."""
    from flax import nnx

    state = nnx.state(model)
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        var.set_value(jax.device_put(var.get_value(), parameter_sharding(name, var.get_value().shape, mesh)))
    nnx.update(model, state)
    return model


def cache_sharding(cache, mesh: Mesh):
    """Shardings for a KV cache pytree: batch over (data, fsdp), kv heads over tensor."""
    def spec(x):
        if x.ndim == 4:  # (batch, entries, kv_heads, head_dim)
            return NamedSharding(mesh, _fit((BATCH, None, "tensor", None), x.shape, mesh))
        return NamedSharding(mesh, _fit((BATCH,), x.shape, mesh))

    return jax.tree.map(spec, cache)


def shard_cache(cache, mesh: Mesh):
    return jax.device_put(cache, cache_sharding(cache, mesh))
