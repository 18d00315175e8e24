"""Test setup: 8 forced CPU devices (before jax is imported) and shared tiny checkpoints."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import make_checkpoints as mk  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def text_checkpoints(tmp_path_factory):
    """variant -> (checkpoint dir, the float32 transformers model that wrote it)."""
    root = tmp_path_factory.mktemp("text")
    out = {}
    for variant in mk.VARIANTS:
        path = str(root / variant)
        out[variant] = (path, mk.save_text_checkpoint(path, variant, hub_config=variant == "rope_scaled"))
    return out


@pytest.fixture(scope="session")
def left_padded_batch():
    return mk.prompts(mk.TEXT_BASE["vocab_size"])

