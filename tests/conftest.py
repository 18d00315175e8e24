"""Test setup: 8 forced CPU devices (before jax is imported), one XLA compilation cache for the run,
and shared tiny checkpoints."""

import atexit
import json
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite starts dozens of worker processes on the same tiny models; they (and this process) share
# JAX's persistent compilation cache, so each program is compiled by XLA once per run. A fresh
# directory: nothing compiled by an earlier run or other code is reused.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="gemma3-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import gemma_tokenizer, services  # noqa: E402
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



@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory):
    """A random multimodal checkpoint with a Gemma-style tokenizer.json, as the services load it."""
    path = str(tmp_path_factory.mktemp("served-model"))
    tok = gemma_tokenizer.write(path)
    ids = {s: tok.token_to_id(s) for s in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    hf = mk.hf_multimodal_model(seed=11, text={"vocab_size": tok.get_vocab_size()}, embed_std=0.1,
                                image_token_index=ids["<image_soft_token>"], boi_token_index=ids["<start_of_image>"],
                                eoi_token_index=ids["<end_of_image>"])
    hf.save_pretrained(path)
    size = mk.VISION_BASE["image_size"]
    with open(f"{path}/preprocessor_config.json", "w") as f:
        json.dump({"image_processor_type": "Gemma3ImageProcessor", "size": {"height": size, "width": size},
                   "resample": 2, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, f)
    return path


@pytest.fixture(scope="session")
def reference(served_checkpoint):
    """Our model and prompt builder on the served checkpoint, in this process, for expected answers."""
    from gemma3 import Gemma3ForConditionalGeneration
    from lm_worker.prompts import PromptBuilder

    model = Gemma3ForConditionalGeneration.from_pretrained(served_checkpoint)
    return model, PromptBuilder.from_pretrained(served_checkpoint, model.config)


@pytest.fixture(scope="session")
def lm_worker(served_checkpoint):
    """Longer prompts prefill in chunks of 64 tokens here, as the default's 512 do at a real context."""
    with services.running("lm_worker", "gemma3serve.v1.LMWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--num-slots", "4", "--max-length", "256", "--max-queue", "32",
                          "--redis-url", services.REDIS_URL, "--warm-up", "all", "--prefill-chunk", "64",
                          env={"JAX_LOG_COMPILES": "1"}) as (proc, target):  # (its log names every compile)
        yield proc, target


@pytest.fixture(scope="session")
def vision_worker(served_checkpoint):
    with services.running("vision_worker", "gemma3serve.v1.VisionWorker", "--model", served_checkpoint,
                          "--dtype", "float32", "--redis-url", services.REDIS_URL, "--cache-ttl", "120") as running:
        yield running


@pytest.fixture(scope="session")
def stack(lm_worker, vision_worker):
    """The gateway in front of the session's LM and vision workers: the whole stack."""
    with services.running("gateway", "gemma3serve.v1.Gateway", "--lm-target", lm_worker[1],
                          "--vision-target", vision_worker[1]) as (_, target):
        yield target
