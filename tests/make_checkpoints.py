"""Tiny random Gemma 3 checkpoints written by transformers itself, and their reference outputs.

Every weight is drawn at random (transformers initialises RMSNorm offsets to zero, which would hide a
``w`` vs ``1 + w`` bug), the sliding window is small enough for test sequences to cross it, final-logit
softcapping is on and attention is grouped-query. Seeds are fixed.

Run as a script to write the checkpoints and reference outputs to a folder:
    python tests/make_checkpoints.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

TEXT_BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, sliding_window=5, sliding_window_pattern=3, query_pre_attn_scalar=24,
    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, rms_norm_eps=1e-6, max_position_embeddings=256,
    rope_theta=10_000.0, rope_local_base_freq=100.0, pad_token_id=0, eos_token_id=1, bos_token_id=2,
)

VARIANTS = {
    "base": {},
    # the published-checkpoint config style (rope_scaling, sliding_window_pattern) with linear scaling
    "rope_scaled": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, final_logit_softcapping=None),
    "untied": dict(tie_word_embeddings=False),
}


def randomize(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    """Draw every parameter at random: linear weights ~ N(0, 0.15), norm offsets ~ N(0, 0.5).
    Embeddings of std 1 give very peaked next-token distributions (the same token whatever the
    prompt); services tests use 0.1, so that answers depend on the prompt and the images."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.5 if "norm" in name else (embed_std if "embed" in name else 0.15)
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def text_config_dict(variant: str = "base", **overrides) -> dict:
    return {**TEXT_BASE, **VARIANTS[variant], **overrides}


def hf_text_model(variant: str = "base", seed: int = 0, cls_name: str = "Gemma3ForCausalLM", **overrides):
    """A random transformers text model (eager attention, float32, eval mode)."""
    import transformers

    cfg = text_config_dict(variant, **overrides)
    config = transformers.Gemma3TextConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(config).eval()
    randomize(model, seed)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None  # greedy runs its full length in the parity tests
        model.generation_config.pad_token_id = 0
    return model


def write_hub_style_config(path: str, variant: str, **overrides) -> None:
    """Replace config.json with the style of the published checkpoints (sparse, old key names)."""
    cfg = text_config_dict(variant, **overrides)
    cfg.update(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], torch_dtype="float32")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def save_text_checkpoint(path: str, variant: str = "base", seed: int = 0, dtype=torch.float32,
                         max_shard_size: str | None = None, hub_config: bool = False, **overrides):
    """Write a random checkpoint with transformers' save_pretrained and return the model (float32)."""
    model = hf_text_model(variant, seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(dtype).save_pretrained(path, **kwargs)
    model.to(torch.float32)
    if hub_config:
        write_hub_style_config(path, variant, **overrides)
    return model


def prompts(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A left-padded batch: row 0 has 3 pads, row 1 none; 15 positions cross the window of 5."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(2, 15))
    mask = np.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def hf_positions(mask: np.ndarray) -> np.ndarray:
    """The position ids transformers' generate uses for a left-padded batch."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for variant in VARIANTS:
        path = os.path.join(out, variant)
        model = save_text_checkpoint(path, variant, hub_config=variant == "rope_scaled")
        ids, mask = prompts(model.config.vocab_size)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(hf_positions(mask))).logits.numpy()
            greedy = model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=20,
                                    do_sample=False).numpy()
        np.savez(os.path.join(path, "reference.npz"), input_ids=ids, attention_mask=mask, logits=logits,
                 greedy=greedy)
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny-checkpoints")


VISION_BASE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=42,
                   patch_size=7, layer_norm_eps=1e-6, vision_use_head=False)
MULTIMODAL_BASE = dict(mm_tokens_per_image=9, image_token_index=150, boi_token_index=151, eoi_token_index=152)


def hf_multimodal_model(seed: int = 0, text: dict | None = None, embed_std: float = 1.0, **overrides):
    """A random transformers Gemma3ForConditionalGeneration: 6x6 patches pooled to 3x3 = 9 image tokens,
    so one image's block is longer than the sliding window (5) and is cut by it on sliding layers."""
    import transformers

    text_cfg = {**TEXT_BASE, "final_logit_softcapping": None, **(text or {})}
    text_cfg.pop("sliding_window_pattern")
    text_cfg["layer_types"] = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    config = transformers.Gemma3Config(text_config=text_cfg, vision_config=VISION_BASE,
                                       **{**MULTIMODAL_BASE, **overrides})
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    randomize(model, seed, embed_std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def image_prompt(images_per_row: list[int], length: int, seed: int = 0, pad_to: int | None = None):
    """input_ids, attention_mask, token_type_ids for rows with the given number of images each:
    text, then per image <boi> 9 x <image> <eoi>, then text; left-padded to a common length."""
    rng = np.random.default_rng(seed)
    c = MULTIMODAL_BASE
    rows = []
    for n in images_per_row:
        row = [2] + list(rng.integers(3, 140, 3))
        for _ in range(n):
            row += [c["boi_token_index"]] + [c["image_token_index"]] * c["mm_tokens_per_image"] + [c["eoi_token_index"]]
            row += list(rng.integers(3, 140, 2))
        rows.append(row + list(rng.integers(3, 140, max(0, length - len(row)))))
    width = max(pad_to or 0, max(len(r) for r in rows))
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    token_type = (ids == c["image_token_index"]).astype(np.int64)
    return ids, mask, token_type


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    size = VISION_BASE["image_size"]
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)
