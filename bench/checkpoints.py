"""Random multimodal Gemma 3 checkpoints that the serving stack can serve, for benchmarks.

    from bench.checkpoints import write_multimodal_checkpoint
    from bench.model import SHAPES
    path = write_multimodal_checkpoint("/tmp/g3-270m-mm", SHAPES["270m"],
                                       dict(image_size=224, patch_size=14, hidden_size=384, ...))

``write_multimodal_checkpoint`` builds a transformers ``Gemma3ForConditionalGeneration`` of any text and
vision shape, draws every weight at random (``tests.make_checkpoints.randomize``: matrices of std 0.15, norm
offsets 0.5, embeddings of std ``embed_std``), writes it with
``save_pretrained`` in float32 safetensors, and next to it the demo's Gemma-pipeline tokenizer (special
tokens at Gemma's ids, 256 byte-fallback tokens, the demo's words; ``demo.tokenizer``), the chat
template, the image processor config and ``generation_config.json`` (eos: ``<eos>``, ``<end_of_turn>``).

For benchmarks every answer must run to ``max_new_tokens`` (the API has no "ignore EOS"), so by default
(``never_stop``) the output-embedding rows of the stop tokens (``<eos>``, ``<end_of_turn>``) and of every
id the tokenizer does not have (the 270m vocabulary is 262,144 wide; the tokenizer ~420) are set to the
mean of the other rows. Their logit is then the mean of the others' logits, which is below the largest
whatever the hidden state (a point inside the convex hull of the rows never wins a max), so greedy
decoding never stops and only streams tokens the tokenizer can decode. (Zero rows would not do: a trained
model's logits can all be negative, and the demo model's are when it wants to end its turn.) The LM head
is still the full (vocab x hidden) matmul: the cost per step is the real model's. With tied embeddings
(Gemma 3's default) those rows are the embedding's, which the prompts never use except ``<end_of_turn>``
(the weights are random anyway).

Why a small ``embed_std`` (default 0.125 / sqrt(hidden_size): 0.005 for 270m): with tied embeddings the
logit of the current token carries its own embedding's squared norm (~ sqrt(hidden) * hidden * std^2 after
Gemma's sqrt(hidden) input scaling) while every other token's is a random dot product; with the 0.1 the
tiny test models use, a 640-wide model answers every prompt by repeating its last token ("\n") forever.
At 0.125 / sqrt(hidden) greedy answers vary with the prompt and the image and repeat little.

``write_multimodal_checkpoint`` returns at once when ``path`` already holds a checkpoint written with the
same arguments (``bench_meta.json``), so callers can call it every run.

``never_stopping_copy(src, dst)`` does the same for an existing checkpoint (the demo model): a copy whose
LM head is untied from the embedding, equal to it except the stop tokens' rows (the mean of the others),
so the model answers exactly as before and then continues instead of ending its turn.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

META = "bench_meta.json"
VISION_DEFAULTS = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3, vision_use_head=False,
                       attention_dropout=0.0)


def default_mm_tokens(vision: dict) -> int:
    """Gemma 3's 256 image tokens when the patch grid pools evenly to 16 x 16, else one token per patch."""
    side = vision["image_size"] // vision["patch_size"]
    return 256 if side % 16 == 0 else side * side


def _check_mm_tokens(vision: dict, mm_tokens: int) -> None:
    side, per_side = vision["image_size"] // vision["patch_size"], math.isqrt(mm_tokens)
    if per_side * per_side != mm_tokens or side % per_side:
        raise ValueError(f"mm_tokens_per_image={mm_tokens} must be a square whose side divides the patch grid "
                         f"({side} x {side})")


def _stop_ids(tok) -> list[int]:
    return [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]


def _unreachable(head, stops: list[int], n_tok: int) -> None:
    """Rows ``stops`` and from ``n_tok`` on (in place, torch or numpy) := the mean of the other rows: their
    logit is the mean logit, never the largest, so greedy decoding never picks them."""
    keep = [i for i in range(n_tok) if i not in set(stops)]
    centroid = head[keep].mean(0)
    head[n_tok:] = centroid
    head[stops] = centroid


def _meta_matches(path: str, meta: dict) -> bool:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f) == json.loads(json.dumps(meta))
    except (OSError, ValueError):
        return False


def write_multimodal_checkpoint(path: str, text: dict, vision: dict, seed: int = 0, *,
                                mm_tokens_per_image: int | None = None, embed_std: float | None = None,
                                never_stop: bool = True) -> str:
    """Write a random ``Gemma3ForConditionalGeneration`` (float32 safetensors) and its tokenizer and
    processor files to ``path``; return ``path``.

    ``text``: Gemma3TextConfig fields (e.g. ``bench.model.SHAPES["270m"]``; ``sliding_window_pattern`` or
    ``layer_types``; the vocabulary must be at least the tokenizer's, ~420; special-token ids are the
    tokenizer's and override any given). ``vision``: SiglipVisionConfig fields (image_size, patch_size,
    hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, ...; an ``mm_tokens_per_image``
    key there is taken as the argument). ``embed_std``: default 0.125 / sqrt(hidden_size) (see the module's
    docstring). ``mm_tokens_per_image``: image tokens after pooling (default 256
    when the patch grid's side is a multiple of 16, else one per patch). ``never_stop``: zero output rows
    for the stop tokens and the ids beyond the tokenizer (see the module's docstring).
    """
    vision = dict(vision)
    mm_tokens = vision.pop("mm_tokens_per_image", None) if mm_tokens_per_image is None else mm_tokens_per_image
    vision = {**VISION_DEFAULTS, **vision}
    mm_tokens = mm_tokens or default_mm_tokens(vision)
    _check_mm_tokens(vision, mm_tokens)
    if embed_std is None:
        embed_std = 0.125 / math.sqrt(text.get("hidden_size", 2304))
    meta = {"text": text, "vision": vision, "seed": seed, "mm_tokens_per_image": mm_tokens, "embed_std": embed_std,
            "never_stop": never_stop, "format": 2}
    if _meta_matches(path, meta):
        return path

    import torch
    import transformers

    from bench.model import COMMON
    from demo.tokenizer import build_tokenizer, token_ids, write_processor_files
    from tests.make_checkpoints import randomize

    tok = build_tokenizer()
    ids = token_ids(tok)
    n_tok = tok.get_vocab_size()
    text_cfg = {**COMMON, "vocab_size": n_tok, **text, "pad_token_id": ids["<pad>"], "bos_token_id": ids["<bos>"],
                "eos_token_id": _stop_ids(tok)}
    if text_cfg["vocab_size"] < n_tok:
        raise ValueError(f"vocab_size {text_cfg['vocab_size']} is smaller than the tokenizer's {n_tok}")
    if "layer_types" in text_cfg:
        text_cfg.pop("sliding_window_pattern", None)
    config = transformers.Gemma3Config(
        text_config=text_cfg, vision_config=vision, mm_tokens_per_image=mm_tokens,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=text_cfg.get("tie_word_embeddings", True))
    torch.manual_seed(seed)
    with torch.no_grad():
        model = transformers.Gemma3ForConditionalGeneration(config).eval()
        randomize(model, seed, embed_std)
        if never_stop:
            _unreachable(model.get_output_embeddings().weight, _stop_ids(tok), n_tok)
    shutil.rmtree(path, ignore_errors=True)
    model.to(torch.float32).save_pretrained(path)
    del model
    os.chmod(os.path.join(path, "model.safetensors"), 0o644)  # safetensors writes 0600 (a temp file renamed)
    write_processor_files(path, tok, vision["image_size"], mm_tokens)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": ids["<bos>"], "eos_token_id": _stop_ids(tok), "pad_token_id": ids["<pad>"],
                   "do_sample": False}, f, indent=2)
    with open(os.path.join(path, META), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def never_stopping_copy(src: str, dst: str) -> str:
    """A copy of checkpoint ``src`` in ``dst`` whose LM head never emits a stop token (see the module's
    docstring); returns ``dst`` (reused when it is already that copy)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file
    from tokenizers import Tokenizer

    src = os.path.abspath(src)
    weights = os.path.join(src, "model.safetensors")
    meta = {"source": src, "mtime": os.path.getmtime(weights), "size": os.path.getsize(weights), "format": 2}
    if _meta_matches(dst, meta):
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    text = config.get("text_config", config)
    stops = set(_stop_ids(Tokenizer.from_file(os.path.join(dst, "tokenizer.json"))))
    eos = text.get("eos_token_id")
    stops.update([eos] if isinstance(eos, int) else (eos or []))
    tensors = load_file(weights)
    if "lm_head.weight" not in tensors:
        embed = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors["lm_head.weight"] = tensors[embed].copy()
    head = np.array(tensors["lm_head.weight"])
    _unreachable(head, sorted(s for s in stops if s is not None and s < head.shape[0]), head.shape[0])
    tensors["lm_head.weight"] = head
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    config["tie_word_embeddings"] = False
    if "text_config" in config:
        config["text_config"]["tie_word_embeddings"] = False
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(dst, META), "w") as f:
        json.dump(meta, f, indent=2)
    return dst
