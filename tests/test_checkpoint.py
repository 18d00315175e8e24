"""The loader: file layouts, key layouts, dtypes, and errors that name the tensors at fault."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gemma3 import CheckpointError, Gemma3ForCausalLM
from tests import make_checkpoints as mk

IDS = np.array([[2, 17, 40, 99, 7, 150, 3, 33, 21, 8, 64, 5]])


def hf_logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.numpy()


def our_logits(path, **kw):
    return np.asarray(Gemma3ForCausalLM.from_pretrained(path, **kw)(jnp.asarray(IDS)).logits)


def test_sharded_files_with_index(tmp_path):
    hf = mk.save_text_checkpoint(str(tmp_path), "untied", seed=5, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 2
    np.testing.assert_allclose(our_logits(tmp_path), hf_logits(hf), atol=1e-4)


def test_bfloat16_file_loads_into_float32_and_bfloat16(tmp_path):
    mk.save_text_checkpoint(str(tmp_path), "base", seed=6, dtype=torch.bfloat16)
    import transformers

    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    np.testing.assert_allclose(our_logits(tmp_path), hf_logits(hf), atol=1e-4)
    model = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    assert model.model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16
    logits = model(jnp.asarray(IDS)).logits
    assert logits.dtype == jnp.bfloat16
    # bf16 compute drifts from f32 but must stay close: top token mostly agrees
    agree = (np.asarray(logits.astype(jnp.float32)).argmax(-1) == hf_logits(hf).argmax(-1)).mean()
    assert agree >= 0.75


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."], ids=["hub", "transformers5"])
def test_multimodal_key_layouts_load_the_text_model(tmp_path, prefix):
    hf = mk.hf_text_model("base", seed=7)
    tensors = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model."):
            tensors[prefix + k[len("model."):]] = v.contiguous()
    vision = "vision_tower.vision_model." if prefix.startswith("language_model") else "model.vision_tower."
    tensors[vision + "embeddings.patch_embedding.weight"] = torch.zeros(8, 3, 2, 2)
    tensors[prefix.split("language_model")[0] + "multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    text = mk.text_config_dict("base")
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                   "text_config": text, "vision_config": {"hidden_size": 8}}, f)
    np.testing.assert_allclose(our_logits(tmp_path), hf_logits(hf), atol=1e-4)


def test_our_save_pretrained_loads_in_transformers(tmp_path):
    import transformers

    model = Gemma3ForCausalLM.from_pretrained(_base(tmp_path / "src"))
    model.save_pretrained(tmp_path / "out")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS)).logits), hf_logits(hf), atol=1e-4)


def _base(path):
    mk.save_text_checkpoint(str(path), "base", seed=8)
    return path


def _rewrite(path, edit):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file as save_np

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_np(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    path = _base(tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor model\.layers\.2\.mlp\.up_proj\.weight"):
        Gemma3ForCausalLM.from_pretrained(path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _base(tmp_path)

    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite(path, edit)
    with pytest.raises(CheckpointError, match=r"mis-shaped tensor model\.layers\.1\.self_attn\.k_proj\.weight: "
                                              r"expected \(32, 64\), found \(16, 64\)"):
        Gemma3ForCausalLM.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _base(tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.9.extra.weight": np.zeros(3, ml_dtypes.bfloat16)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.extra\.weight"):
        Gemma3ForCausalLM.from_pretrained(path)


def test_untied_config_without_head_tensor_fails(tmp_path):
    path = _base(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensor lm_head\.weight"):
        Gemma3ForCausalLM.from_pretrained(path)


def test_progress_bar_reports_bytes(tmp_path, capsys):
    Gemma3ForCausalLM.from_pretrained(_base(tmp_path), progress=True)
    assert "loading" in capsys.readouterr().err


def test_large_tensors_placed_in_pieces_equal_whole_ones(tmp_path, monkeypatch):
    """Tensors above CHUNK_BYTES are written in place piece by piece: kernels (stored transposed) and the
    embedding come out bit-identical to the whole-tensor path, in float32 and in bfloat16."""
    from flax import nnx

    from gemma3 import checkpoint

    mk.save_text_checkpoint(str(tmp_path), "untied", seed=9)
    for dtype in (jnp.float32, jnp.bfloat16):
        whole = nnx.to_flat_state(nnx.state(Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=dtype)))
        for on_host in (True, False):  # assembled on the host and adopted (the CPU), or written on the device
            with monkeypatch.context() as m:
                m.setattr(checkpoint, "CHUNK_BYTES", 1000)  # every matrix in 2-40 pieces, some uneven
                if not on_host:
                    m.setattr(checkpoint, "_adopts_host_arrays", lambda *_: False)
                pieces = nnx.to_flat_state(nnx.state(Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=dtype)))
            for (path, a), (_, b) in zip(whole, pieces, strict=True):
                np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                              err_msg=f"{path} {dtype.__name__} on_host={on_host}")


def test_loading_compiles_no_program_on_the_cpu(tmp_path, monkeypatch):
    """Large tensors are assembled on the host and adopted by XLA's CPU client without a copy, so the
    loader compiles nothing (each compiled program keeps about 1.5 MB for the rest of the process)."""
    from jax.sharding import SingleDeviceSharding

    from gemma3 import checkpoint, heap

    device = SingleDeviceSharding(jax.devices("cpu")[0])
    assert checkpoint._adopts_host_arrays(device, np.dtype(np.float32))
    assert checkpoint._adopts_host_arrays(device, np.dtype(jnp.bfloat16))
    mk.save_text_checkpoint(str(tmp_path), "untied", seed=9)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)  # every matrix through the large-tensor path
    jax.clear_caches()  # what an earlier test compiled would not compile again
    compiles = []
    listener = lambda event, duration, **_: event == heap.COMPILE_EVENT and compiles.append(duration)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        model = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=jnp.bfloat16)
        jax.block_until_ready(model)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


LOAD_PEAK = """
import sys
import jax
from gemma3 import Gemma3ForCausalLM

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))

jax.jit(lambda x: x + 1)(1).block_until_ready()  # the compiler's one-time start-up is not the loader's
before = status("VmRSS")
model = Gemma3ForCausalLM.from_pretrained(sys.argv[1])
jax.block_until_ready(model)
print(status("VmHWM") - before)
"""


def test_loading_peaks_near_the_weights_size(tmp_path):
    """Loading holds little beyond the placed weights (one 16 MiB piece, one small compile), neither the
    file's mapped pages nor a second host copy: before, this 141 MB checkpoint peaked at 309 MiB."""
    import subprocess
    import sys

    mk.save_text_checkpoint(str(tmp_path), "base", seed=3, vocab_size=65_536, hidden_size=512, head_dim=128,
                            intermediate_size=64, num_hidden_layers=2)
    weights = os.path.getsize(tmp_path / "model.safetensors")
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
    growth = int(out.stdout.split()[-1])
    assert growth < weights + (96 << 20), (growth >> 20, weights >> 20)
