"""Hugging Face safetensors checkpoints: loading onto a mesh tensor by tensor, and saving.

Loading never holds a whole checkpoint in host memory: files are memory-mapped, and each device's
slice of each tensor is read, converted and placed on that device straight from the map
(``jax.make_array_from_callback``). safetensors' own numpy reader rejects bfloat16 and its flax
reader stages every tensor on one device, hence the small reader here; writing uses safetensors.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from collections.abc import Callable
from functools import cache, partial

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from gemma3 import heap
from gemma3.sharding import parameter_sharding

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the offending tensors are named."""


class SafetensorsFile:
    """A memory-mapped .safetensors file: tensors are views, read from disk only where sliced."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._data = np.memmap(path, np.uint8, "r", offset=8 + n) if header else None
        self.tensors = header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        return self._data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])

    def release(self) -> None:
        """Drop the pages read so far from this process's memory (they stay in the page cache).

        Without this, every tensor read through the mapping stays resident until the file is closed,
        so loading peaks at the checkpoint's size on top of the placed weights.
        """
        if self._data is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._data._mmap.madvise(mmap.MADV_DONTNEED)


class Checkpoint:
    """All tensors of a checkpoint directory: one model.safetensors, or shards with an index."""

    def __init__(self, path: str | os.PathLike):
        path = os.fspath(path)
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no .safetensors files in {path}")
        self.files = [SafetensorsFile(os.path.join(path, f)) for f in files]
        self.where = {name: f for f in self.files for name in f.tensors}
        self.nbytes = sum(os.path.getsize(f.path) for f in self.files)


# Checkpoint key prefixes, mapped to the transformers 5.x text-model names our parameters carry.
# Hub multimodal checkpoints nest the text model as language_model.model.*; transformers 5.x as
# model.language_model.*.
TEXT_PREFIXES = [
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
]
VISION_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def text_key(key: str) -> str | None:
    """The text-model name of a checkpoint key, or None for keys a text model ignores (vision)."""
    return None if key.startswith(VISION_PREFIXES) else _rename(key, TEXT_PREFIXES)


# Every multimodal layout, mapped to our parameter names (transformers' module names, without the
# ``vision_model.`` level). The pooling head of SigLIP is unused by Gemma 3 and skipped.
MULTIMODAL_PREFIXES = [
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
]
# What transformers 5.x's save_pretrained writes, and so what we write.
SAVED_PREFIXES = [
    ("model.vision_tower.", "vision_tower."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
]


def _rename(key: str, table) -> str:
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def multimodal_key(key: str) -> str | None:
    name = _rename(key, MULTIMODAL_PREFIXES)
    return None if name.startswith("model.vision_tower.head.") else name


def multimodal_saved_key(name: str) -> str:
    return _rename(name, SAVED_PREFIXES)


def _hf_name(path: tuple) -> tuple[str, bool]:
    """(checkpoint name, stored transposed) of an NNX parameter path."""
    *head, leaf = map(str, path)
    if leaf == "kernel":
        return ".".join(head + ["weight"]), True
    if leaf in ("embedding", "scale", "planes"):  # nnx.Embed, nnx.LayerNorm, SplitFloat32Embed
        return ".".join(head + ["weight"]), False
    return ".".join(head + [leaf]), False


def _reader(array: np.ndarray, transposed: bool, dtype, seen: dict | None = None, key: str = "") -> Callable:
    """Reads one device's slice; ``seen`` collects the distinct slices' byte counts (from the file)."""
    def read(index):
        part = array.T[index] if transposed else array[index]
        if seen is not None:
            seen[(key, str(index))] = part.nbytes
        return np.ascontiguousarray(part, dtype=dtype)  # one copy: transposed and cast in one pass

    return read


CHUNK_BYTES = 16 << 20


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _write_slice(out: jax.Array, chunk: jax.Array, start, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(out, chunk, start, axis)


def _place_in_chunks(array: np.ndarray, transposed: bool, dtype, device, release: Callable) -> jax.Array:
    """One large tensor placed on one device in 16 MiB pieces of its source.

    Placing it whole would hold the source pages and the host copy, each as big as the tensor, beside
    the device buffer: for the 0.7 GB float32 embedding of gemma-3-270m that is most of the loading peak.
    On the CPU the pieces fill a host array that the device then adopts without a copy; elsewhere each
    piece is written in place into the device buffer.
    """
    shape = array.T.shape if transposed else array.shape
    axis = array.ndim - 1 if transposed else 0  # the source's leading axis, in the placed layout
    pieces = max(1, -(-array.nbytes // CHUNK_BYTES))
    host = _aligned_empty(shape, dtype) if _adopts_host_arrays(device, np.dtype(dtype)) else None
    out = jax.numpy.zeros(shape, dtype, device=device) if host is None else None
    start = 0
    for rows in np.array_split(np.arange(array.shape[0]), pieces):
        part = array[rows[0]:rows[-1] + 1]
        if host is not None:
            np.moveaxis(host, axis, 0)[start:start + len(rows)] = part  # cast (and transposed) as it is copied
        else:
            chunk = jax.device_put(np.ascontiguousarray(part.T if transposed else part, dtype=dtype), device)
            chunk.block_until_ready()
            out = _write_slice(out, chunk, start, axis)
        release()
        start += len(rows)
    return out if host is None else jax.device_put(host, device)


def _split(path: tuple) -> int:
    """1 for the planes of a `SplitFloat32Embed` (whose leading axis the checkpoint's tensor lacks), else 0."""
    return int(str(path[-1]) == "planes")


def _place_planes(array: np.ndarray, device, release: Callable) -> jax.Array:
    """A (V, D) table as a `SplitFloat32Embed`'s planes (2, V, D) uint16, filled from 16 MiB pieces of its source:
    the top halves of its float32 values, then the bottom halves."""
    host = _aligned_empty((2, *array.shape), np.uint16)
    for rows in np.array_split(np.arange(array.shape[0]), max(1, -(-array.nbytes // CHUNK_BYTES))):
        bits = np.ascontiguousarray(array[rows[0]:rows[-1] + 1], dtype=np.float32).view(np.uint32)
        host[0, rows[0]:rows[-1] + 1] = bits >> 16
        host[1, rows[0]:rows[-1] + 1] = bits & 0xFFFF
        release()
    return jax.device_put(host, device)


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised host array whose data starts on a 64-byte boundary, as XLA's CPU client needs
    to adopt it."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


@cache
def _adopts_host_arrays(sharding: SingleDeviceSharding, dtype: np.dtype) -> bool:
    """Whether ``device_put`` of an aligned host array of ``dtype`` keeps its memory instead of copying it
    (XLA's CPU client does). Then a large tensor is assembled on the host: no program compiles for it
    (each compiled program keeps about 1.5 MB: eight of them for gemma-3-1b's shapes), and nothing is
    copied twice."""
    if next(iter(sharding.device_set)).platform != "cpu":
        return False
    probe = _aligned_empty((16,), dtype)
    probe[:] = 0
    return jax.device_put(probe, sharding).unsafe_buffer_pointer() == probe.ctypes.data


def load_pretrained(cls, path, dtype=np.float32, mesh: Mesh | None = None, progress: bool | None = None,
                    config=None, split_head: bool | None = None, screen_head: bool | None = None,
                    keep_panels: bool | None = None):
    """Build ``cls`` from a checkpoint directory without materialising random weights.

    The model is created abstractly (``nnx.eval_shape``); each parameter is then read from its
    tensor and placed by the mesh's partition rules (or on the default device without a mesh).
    Missing, unexpected and mis-shaped tensors are all reported at once, by name. Checkpoint keys
    are renamed by ``cls.checkpoint_key`` (default: the text-model layouts). ``split_head``: keep a tied
    float32 head as `gemma3.text.SplitFloat32Embed` (None: wherever it can, without a mesh), written straight
    into its planes. ``screen_head``: give a tied bfloat16 head an int8 screen for greedy decode
    (`gemma3.text.HeadScreen`; None: wherever it can, without a mesh). ``keep_panels``: keep the text decoder's
    layer weights as the CPU kernel's panels (`keep_panels` of the causal-LM classes; None: wherever it can,
    without a mesh).
    """
    from gemma3.text import head_screens, head_splits, panels_kept

    path = os.fspath(path)
    config = config if config is not None else cls.config_class.from_pretrained(path)
    if split_head is None:
        split_head = mesh is None and hasattr(cls, "split_head") and head_splits(config, dtype)
    if screen_head is None:
        screen_head = mesh is None and hasattr(cls, "screen_head") and head_screens(config, dtype)
    if keep_panels is None:
        keep_panels = mesh is None and hasattr(cls, "keep_panels") and panels_kept(dtype)

    def build():
        model = cls(config, dtype=dtype, rngs=nnx.Rngs(0))
        if split_head:
            model.split_head()
        return model

    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    ckpt = Checkpoint(path)
    key_map = getattr(cls, "checkpoint_key", text_key)
    available = {}
    for key in ckpt.where:
        name = key_map(key)
        if name is not None:
            available[name] = key
    tied = getattr(config, "tie_word_embeddings", False)
    params = {_hf_name(p)[0]: (p, v) for p, v in nnx.to_flat_state(state)}
    if tied:
        available.pop("lm_head.weight", None)  # some writers store the tied copy; the embedding rules
    missing = sorted(set(params) - set(available))
    unexpected = sorted(available[n] for n in set(available) - set(params))
    wrong = []
    for name, (p, v) in params.items():
        if name in available:
            _, transposed = _hf_name(p)
            found = ckpt.where[available[name]].shape(available[name])
            want = tuple(v.get_value().shape)[_split(p):]
            if (found[::-1] if transposed else found) != want:
                wrong.append(f"{available[name]}: expected {want[::-1] if transposed else want}, found {found}")
    if missing or unexpected or wrong:
        lines = [f"checkpoint {path} does not fit {cls.__name__}:"]
        lines += [f"  missing tensor {n}" for n in missing]
        lines += [f"  unexpected tensor {n}" for n in unexpected]
        lines += [f"  mis-shaped tensor {w}" for w in wrong]
        raise CheckpointError("\n".join(lines))

    show = progress if progress is not None else ckpt.nbytes > 1 << 30
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=ckpt.nbytes, unit="B", unit_scale=True, desc=f"loading {os.path.basename(path)}")
    device = SingleDeviceSharding(jax.devices()[0])
    seen: dict = {}
    total = 0
    for name, (p, v) in params.items():
        key = available[name]
        source = ckpt.where[key].array(key)
        total += source.nbytes
        shape = tuple(v.get_value().shape)
        sharding = parameter_sharding(".".join(map(str, p)), shape, mesh) if mesh is not None else device
        transposed = _hf_name(p)[1]
        if _split(p):
            value = _place_planes(source, device, ckpt.where[key].release)
            seen[(key, "all")] = source.nbytes
        elif mesh is None and source.nbytes > CHUNK_BYTES:
            value = _place_in_chunks(source, transposed, dtype, device, ckpt.where[key].release)
            seen[(key, "all")] = source.nbytes
        else:
            value = jax.make_array_from_callback(shape, sharding, _reader(source, transposed, dtype, seen, key))
        v.set_value(value.block_until_ready())  # the copy is asynchronous: wait before dropping its source pages
        if bar is not None:
            bar.update(source.nbytes)
        del source
        ckpt.where[key].release()
    if bar is not None:
        bar.close()
    # make_array_from_callback asks only for this process's devices' slices: in a multi-host group each
    # process reads its part of the file, not all of it.
    log.info("weights read", extra={"checkpoint": path, "bytes_read": sum(seen.values()), "tensor_bytes": total})
    # after its first 16 MiB piece glibc serves pieces that size from its heap, which kept 55 MB of
    # gemma-3-270m's float32 load resident beside the weights, under everything the process does next
    heap.release()
    model = nnx.merge(graphdef, state)
    if screen_head:  # built from the loaded table (it is no checkpoint tensor)
        model.screen_head()
    if keep_panels:
        model.keep_panels()
        heap.release()  # the weights as they were, freed
    return model


def save_pretrained(model, path, architecture: str | None = None) -> None:
    """config.json + model.safetensors in transformers 5.x's layout (kernels back to (out, in))."""
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [architecture or model.hf_architecture]
    if hasattr(model, "num_labels"):
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(model.num_labels)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    tensors = {}
    rename = getattr(model, "saved_key", lambda name: name)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = _hf_name(p)
        name = rename(name)
        value = v.get_value()
        if _split(p):
            from gemma3.text import SplitFloat32Embed

            value = SplitFloat32Embed.join(value)
        if str(p[-1]) == "kernel" and value.ndim == 3:  # kept as the CPU kernel's panels
            from gemma3.cpu_kernels import from_panels

            value = from_panels(value)
        a = np.asarray(jax.device_get(value))
        tensors[name] = np.ascontiguousarray(a.T if transposed else a)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
