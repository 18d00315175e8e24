"""Gemma3ForConditionalGeneration against transformers' on tiny random multimodal checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from gemma3 import Gemma3ForConditionalGeneration, create_mesh
from tests import make_checkpoints as mk
from tests.helpers import max_error_on_mask


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm")
    hf = mk.hf_multimodal_model(seed=1)
    hf.save_pretrained(path)
    return str(path), hf, Gemma3ForConditionalGeneration.from_pretrained(path)


def _hf_logits(hf, ids, mask, tt, pixels):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(mk.hf_positions(mask)), token_type_ids=torch.tensor(tt),
                  pixel_values=None if pixels is None else torch.tensor(pixels)).logits.numpy()


def _our_logits(model, ids, mask, tt, pixels):
    return model(jnp.asarray(ids), None if pixels is None else jnp.asarray(pixels), jnp.asarray(mask),
                 jnp.asarray(mk.hf_positions(mask)), token_type_ids=jnp.asarray(tt)).logits


def test_image_features_match(pair):
    _, hf, ours = pair
    pixels = mk.random_pixels(3, seed=4)
    with torch.no_grad():
        ref = hf.get_image_features(torch.tensor(pixels)).pooler_output.numpy()
    got = np.asarray(ours.get_image_features(jnp.asarray(pixels)))
    assert got.shape == (3, 9, 64)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("images", [[1], [2], [1, 0], [2, 1]], ids=["one", "two-in-one-prompt", "image+text",
                                                                     "two+one"])
def test_logits_match(pair, images):
    _, hf, ours = pair
    ids, mask, tt = mk.image_prompt(images, length=30, seed=sum(images))
    pixels = mk.random_pixels(sum(images), seed=7)
    ref = _hf_logits(hf, ids, mask, tt, pixels)
    assert max_error_on_mask(_our_logits(ours, ids, mask, tt, pixels), ref, mask) <= 1e-4


@pytest.mark.parametrize("attention", ["kernel", "xla"])
def test_images_in_chunks_appended_to_a_cache_match_transformers(pair, attention):
    """A prompt prefilled in three chunks, each image in a later one: sliding layers (window 5) read their
    ring beside the chunk, full layers the cache with the chunk's image blocks written in. With the
    attention probabilities returned, XLA's attention runs instead of the CPU kernel."""
    _, hf, ours = pair
    ids, mask, tt = mk.image_prompt([2], length=30, seed=5)
    pixels = mk.random_pixels(2, seed=9)
    ref = _hf_logits(hf, ids, mask, tt, pixels)
    features = ours.get_image_features(jnp.asarray(pixels))
    cache, got, used = ours.init_cache(1, 32), [], 0
    for start, end in [(0, 4), (4, 17), (17, 30)]:  # text; <boi> 9 x <image> <eoi> and text; the same again
        n = int(tt[:, start:end].sum()) // mk.MULTIMODAL_BASE["mm_tokens_per_image"]
        out = ours(jnp.asarray(ids[:, start:end]), attention_mask=jnp.ones((1, end - start), bool),
                   past_key_values=cache, token_type_ids=jnp.asarray(tt[:, start:end]),
                   image_features=features[used:used + n] if n else None, output_attentions=attention == "xla")
        cache, used = out.past_key_values, used + n
        got.append(np.asarray(out.logits))
    assert used == 2
    np.testing.assert_allclose(np.concatenate(got, axis=1), ref, atol=1e-4)


def test_greedy_continuation_matches_transformers_generate(pair):
    _, hf, ours = pair
    ids, mask, tt = mk.image_prompt([1, 0], length=20, seed=3)
    pixels = mk.random_pixels(1, seed=8)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          token_type_ids=torch.tensor(tt), pixel_values=torch.tensor(pixels),
                          max_new_tokens=20, do_sample=False).numpy()
    got = ours.generate(ids, mask, pixel_values=pixels, token_type_ids=tt, max_new_tokens=20, eos_token_id=[])
    np.testing.assert_array_equal(got.sequences, ref)


def test_image_encoder_loads_only_the_vision_half(pair):
    from gemma3 import Gemma3ImageEncoder

    path, _, ours = pair
    encoder = Gemma3ImageEncoder.from_pretrained(path)
    assert not hasattr(encoder.model, "language_model")
    pixels = jnp.asarray(mk.random_pixels(2, seed=4))
    np.testing.assert_array_equal(np.asarray(encoder(pixels)), np.asarray(ours.get_image_features(pixels)))


def test_precomputed_image_features_give_the_same_logits(pair):
    _, _, ours = pair
    ids, mask, tt = mk.image_prompt([1], length=20, seed=5)
    pixels = jnp.asarray(mk.random_pixels(1, seed=9))
    a = ours(jnp.asarray(ids), pixels, token_type_ids=jnp.asarray(tt)).logits
    b = ours(jnp.asarray(ids), image_features=ours.get_image_features(pixels), token_type_ids=jnp.asarray(tt)).logits
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_image_token_count_mismatch_is_a_clear_error(pair):
    _, _, ours = pair
    ids, mask, tt = mk.image_prompt([1], length=20)
    with pytest.raises(ValueError, match="the prompt has 9 image tokens, the 2 images give 18"):
        ours(jnp.asarray(ids), jnp.asarray(mk.random_pixels(2)))
    with pytest.raises(ValueError, match="image tokens do not match"):
        ours.generate(ids, mask, pixel_values=mk.random_pixels(2), max_new_tokens=2)


@pytest.mark.parametrize("layout", ["hub", "in-memory"])
def test_other_key_layouts_load(pair, tmp_path, layout):
    path, hf, ours = pair
    import shutil

    shutil.copy(f"{path}/config.json", tmp_path / "config.json")
    if layout == "hub":  # as published: vision_tower.vision_model.*
        tensors = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
                   for k, v in load_file(f"{path}/model.safetensors").items()}
    else:  # transformers' module names: model.language_model.*, model.vision_tower.vision_model.*
        tensors = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    other = Gemma3ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, tt = mk.image_prompt([1], length=20)
    pixels = mk.random_pixels(1)
    np.testing.assert_array_equal(np.asarray(_our_logits(other, ids, mask, tt, pixels)),
                                  np.asarray(_our_logits(ours, ids, mask, tt, pixels)))


def test_image_token_outside_the_vocabulary(tmp_path):
    """Like the real checkpoints' id 262144 where the table is smaller: embedded as pad, then replaced."""
    hf = mk.hf_multimodal_model(seed=2, image_token_index=200)
    hf.save_pretrained(tmp_path)
    ours = Gemma3ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, tt = mk.image_prompt([1, 0], length=24)
    ids = np.where(ids == 150, 200, ids)
    pixels = mk.random_pixels(1, seed=3)
    assert max_error_on_mask(_our_logits(ours, ids, mask, tt, pixels), _hf_logits(hf, ids, mask, tt, pixels),
                             mask) <= 1e-4


def test_softcapping_is_applied_by_apply_lm_head(tmp_path):
    hf = mk.hf_multimodal_model(seed=5, text={"final_logit_softcapping": 3.0})
    hf.save_pretrained(tmp_path)
    ours = Gemma3ForConditionalGeneration.from_pretrained(tmp_path)
    ids, mask, tt = mk.image_prompt([1], length=20)
    pixels = mk.random_pixels(1)
    ref = _hf_logits(hf, ids, mask, tt, pixels)  # transformers skips the cap in this class
    assert np.abs(ref).max() > 3.0
    np.testing.assert_allclose(np.asarray(_our_logits(ours, ids, mask, tt, pixels)), 3.0 * np.tanh(ref / 3.0),
                               atol=1e-4)


def test_sharded_over_eight_devices_equals_single_device(pair):
    path, _, ours = pair
    mesh = create_mesh(fsdp=2, tensor=4)
    sharded = Gemma3ForConditionalGeneration.from_pretrained(path, mesh=mesh)
    fc1 = sharded.get_vision_tower().encoder.layers[0].mlp.fc1.kernel.get_value()
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor") and len(fc1.devices()) == 8
    ids, mask, tt = mk.image_prompt([2, 1], length=30)
    pixels = mk.random_pixels(3)
    got = _our_logits(sharded, ids, mask, tt, pixels)
    # logits here reach ~70: float32 sums in another order differ by a few 1e-5
    np.testing.assert_allclose(np.asarray(got), np.asarray(_our_logits(ours, ids, mask, tt, pixels)), atol=5e-5)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    import transformers

    _, hf, ours = pair
    ours.save_pretrained(tmp_path)
    back = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    original, reloaded = hf.state_dict(), back.state_dict()
    assert set(original) == set(reloaded)
    for name, tensor in original.items():
        assert torch.equal(tensor, reloaded[name]), name
