"""The vision tower's fast paths: blocked attention (exact), float32 accumulation of bfloat16 products,
and the vision worker's batcher (weights as an argument, every batch shape compiled at warm-up)."""

import asyncio

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gemma3 import Gemma3ForConditionalGeneration, Gemma3ImageEncoder, cpu_kernels, heap, vision
from tests import make_checkpoints as mk
from vision_worker.service import Batcher


def dense_attention(q, k, v):
    """The plain softmax(q k^T) v, in float32, as the reference."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("BPH,BQH->BPQ", q, k)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("BPQ,BQH->BPH", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("budget", [None, 100, 2 * 36 * 36, 36 * 36], ids=["one-block", "query-chunks+padding",
                                                                          "two-rows", "one-row"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_blocked_attention_is_exact(monkeypatch, budget, dtype):
    if budget is not None:
        monkeypatch.setattr(vision, "_block_scores", lambda: budget)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((12, 36, 8)), dtype) for _ in range(3))
    got = np.asarray(jax.jit(vision.attention)(q, k, v), np.float32)
    ref = dense_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    np.testing.assert_allclose(got, ref, atol=1e-6 if dtype == jnp.float32 else 2e-2)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm-speed")
    hf = mk.hf_multimodal_model(seed=2)
    hf.save_pretrained(path)
    return str(path), hf, Gemma3ForConditionalGeneration.from_pretrained(path)


@pytest.mark.parametrize("budget", [100, 36 * 36, "kernel"])
def test_blocked_vision_tower_matches_transformers(monkeypatch, pair, budget):
    """XLA's blocked attention (accelerators, and CPUs where the kernel's is not faster), and the CPU kernel's
    (bfloat16 with AMX tiles; here in float32 on any CPU, for its numbers)."""
    _, hf, ours = pair
    if budget == "kernel":
        assert cpu_kernels.available(), "the CI machine has g++: the kernel must build"
        monkeypatch.setattr(vision, "kernel_attends", cpu_kernels.attention_applies)
    else:
        monkeypatch.setattr(vision, "_block_scores", lambda: budget)
        monkeypatch.setattr(vision, "kernel_attends", lambda q, k: False)
    pixels = jnp.asarray(mk.random_pixels(2, seed=5))
    with torch.no_grad():
        ref = hf.get_image_features(torch.tensor(np.asarray(pixels))).pooler_output.numpy()
    features = jax.jit(ours.get_image_features)
    assert (cpu_kernels.ATTENTION_TARGET in features.lower(pixels).as_text()) == (budget == "kernel")
    got = np.asarray(features(pixels))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_attention_derivatives_are_xlas(dtype):
    """The kernel's attention has no derivative of its own: gradients through it are the einsums'."""
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 3, 24)) * 0.5, dtype) for _ in range(3))

    def loss(q, k, v, by_kernel):
        out = (vision.kernel_attention if by_kernel else vision.patch_attention)(q, k, v)
        return jnp.sum(jnp.sin(out.astype(jnp.float32)))

    ours, xla = (jax.grad(loss, argnums=(0, 1, 2))(q, k, v, by) for by in (True, False))
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    for a, b in zip(ours, xla):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_bfloat16_products_accumulate_in_float32(pair):
    path, _, _ = pair
    encoder = Gemma3ImageEncoder.from_pretrained(path, dtype=jnp.bfloat16)
    def dots(jaxpr):  # XLA's products, and our CPU kernel's products and attention (float32 by construction)
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general" or (eqn.primitive.name == "ffi_call" and eqn.params["target_name"]
                                                       in (cpu_kernels.TARGET, cpu_kernels.ATTENTION_TARGET)):
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(jax.make_jaxpr(encoder)(jnp.zeros((1, 3, 42, 42), jnp.float32)).jaxpr))
    # patch embedding, 2 layers x (q, k, v, out, fc1, fc2 and the attention: the kernel's call on the CPU, else
    # XLA's two products), the projector
    attention_products = 1 if not cpu_kernels.float32_gemm() else 2  # where `vision.kernel_attends` in bfloat16
    assert len(found) == 1 + 2 * (6 + attention_products) + 1
    assert all(v.aval.dtype == jnp.float32 for e in found for v in e.outvars), [e.params for e in found]
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in found if e.primitive.name == "dot_general")
    reference = Gemma3ImageEncoder.from_pretrained(path)
    pixels = jnp.asarray(mk.random_pixels(2, seed=6))
    np.testing.assert_allclose(np.asarray(encoder(pixels), np.float32), np.asarray(reference(pixels)), atol=0.05)


def test_batcher_compiles_no_weights_in(pair):
    path, _, _ = pair
    encoder = Gemma3ImageEncoder.from_pretrained(path)
    batcher = Batcher(encoder, max_batch=2)
    lowered = batcher._run.lower(batcher._weights, jax.ShapeDtypeStruct((1, 3, 42, 42), jnp.float32))
    n_weights = len(jax.tree.leaves(nnx.state(encoder)))
    assert len(jax.tree.leaves(lowered.args_info)) == n_weights + 1
    # a weight folded in would be a dense constant, printed as a hex blob
    assert 'dense<"0x' not in lowered.as_text()


def test_warm_up_compiles_every_batch_shape(pair):
    path, _, _ = pair
    encoder = Gemma3ImageEncoder.from_pretrained(path)
    batcher = Batcher(encoder, max_batch=6, wait_ms=0)
    compiles = []

    def listen(event, duration, **_):
        if event == heap.COMPILE_EVENT:
            compiles.append(duration)

    async def go():
        batcher.start()
        try:
            first = await batcher.embed(np.zeros((1, 3, 42, 42), np.float32))  # the worker's warm-up image
            warm = len(compiles)
            pixels = mk.random_pixels(7, seed=7)
            outs = [await batcher.embed(pixels[:n]) for n in (3, 5, 7, 2)]
            return first, warm, outs, pixels
        finally:
            await batcher.stop()

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        first, warm, outs, pixels = asyncio.run(go())
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert sorted(s[0] for s in batcher._compiled) == [1, 2, 4, 8] and warm >= 4
    assert len(compiles) == warm, "a request after warm-up compiled"
    expected = np.asarray(encoder(jnp.asarray(pixels)))
    assert first.shape == (1, 9, 64)
    for n, out in zip((3, 5, 7, 2), outs):
        np.testing.assert_allclose(out, expected[:n], atol=1e-5)


def test_an_idle_tower_runs_a_lone_request_where_it_was_preprocessed(pair, monkeypatch):
    """``embed_alone`` runs the images in the calling thread when the tower is idle, and declines (the
    request then queues) before the batcher started, while the tower is busy and after it stopped;
    requests that queue while a lone one holds the tower go through it as one batch after it."""
    path, _, _ = pair
    encoder = Gemma3ImageEncoder.from_pretrained(path)
    batcher = Batcher(encoder, max_batch=4)
    sizes = []
    forward = batcher._forward
    monkeypatch.setattr(batcher, "_forward", lambda pixels: sizes.append(len(pixels)) or forward(pixels))
    pixels = mk.random_pixels(3, seed=8)
    assert batcher.embed_alone(pixels) is None  # not started

    async def go():
        batcher.start()
        await batcher.embed(np.zeros((1, 3, 42, 42), np.float32))  # warmed up
        sizes.clear()
        alone = await asyncio.to_thread(batcher.embed_alone, pixels[:2])
        batcher._tower.acquire()  # a lone request in the tower
        queued = [asyncio.create_task(batcher.embed(pixels[i:i + 1])) for i in range(3)]
        await asyncio.sleep(0.2)  # the loop holds the first and waits for the tower
        busy = await asyncio.to_thread(batcher.embed_alone, pixels[:1])
        batcher._tower.release()
        batched = await asyncio.gather(*queued)
        await batcher.stop()
        await asyncio.sleep(0)
        return alone, busy, batched, await asyncio.to_thread(batcher.embed_alone, pixels[:1])

    alone, busy, batched, stopped = asyncio.run(go())
    expected = np.asarray(encoder(jnp.asarray(pixels)))
    np.testing.assert_allclose(alone, expected[:2], atol=1e-5)
    np.testing.assert_allclose(np.concatenate(batched), expected, atol=1e-5)
    assert busy is None and stopped is None
    assert sizes == [2, 3]  # the lone run, then the three queued requests in one batch
