"""Prompts for the LM worker: the Gemma 3 chat template, image placeholders expanded into soft
tokens as transformers' ``Gemma3Processor`` does, and tokenization with the checkpoint's tokenizer.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
CROPS_INTRO = "Here is the original image {} and here are some crops to help you see better "


class InvalidRequest(ValueError):
    """Bad input (prompt or sampling): answered with INVALID_ARGUMENT and this message."""


def chat_text(turns) -> str:
    """The Gemma 3 chat template (as in the checkpoints' tokenizer_config.json), generation prompt
    included: a system turn is prefixed to the first user turn; roles must alternate user/assistant;
    text parts are stripped; each image part becomes ``<start_of_image>``."""
    turns = list(turns)
    prefix = ""
    if turns and turns[0].role == "system":  # the template takes the system turn's first part, untrimmed
        first = turns[0].parts[0] if turns[0].parts else None
        prefix = (first.text if first is not None and first.WhichOneof("part") == "text" else "") + "\n\n"
        turns = turns[1:]
    out = ["<bos>"]
    for i, turn in enumerate(turns):
        role = {"assistant": "model", "model": "model", "user": "user"}.get(turn.role)
        if role is None:
            raise InvalidRequest(f"turn {i}: unknown role {turn.role!r} (system, user or assistant)")
        if (role == "user") != (i % 2 == 0):
            raise InvalidRequest("conversation roles must alternate user/assistant/user/..., starting with user")
        body = "".join(BOI if p.WhichOneof("part") == "image" else p.text.strip() for p in turn.parts)
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{body}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


class PromptBuilder:
    """Turns an LMGenerateRequest into token ids and token types (1 at image soft tokens)."""

    def __init__(self, tokenizer: Tokenizer, mm_tokens_per_image: int | None, hidden_size: int,
                 stop_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.mm_tokens = mm_tokens_per_image
        self.embedding_shape = (mm_tokens_per_image, hidden_size) if mm_tokens_per_image else None
        self.stop_token_ids = stop_token_ids
        self.bos_id = tokenizer.token_to_id("<bos>")
        self.soft_id = tokenizer.token_to_id(SOFT)
        full = f"\n\n{BOI}{SOFT * (mm_tokens_per_image or 0)}{EOI}\n\n"
        self._full_image = full

    @classmethod
    def from_pretrained(cls, path: str, config) -> PromptBuilder:
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        text = getattr(config, "text_config", config)
        stops = set(text.eos_token_ids)
        end_of_turn = tokenizer.token_to_id("<end_of_turn>")
        if end_of_turn is not None:
            stops.add(end_of_turn)
        gen = os.path.join(path, "generation_config.json")
        if os.path.exists(gen):
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
            stops.update([eos] if isinstance(eos, int) else (eos or []))
        return cls(tokenizer, getattr(config, "mm_tokens_per_image", None), text.hidden_size, sorted(stops))

    def _expand(self, num_crops: int) -> str:
        if not num_crops:
            return self._full_image
        return CROPS_INTRO.format(self._full_image) + " ".join([self._full_image] * num_crops)

    def build(self, request, crops: list[int]) -> tuple[list[int], np.ndarray]:
        """``crops``: pan-and-scan crops per image of the request (0 without)."""
        kind = request.WhichOneof("prompt")
        if kind == "chat":
            text = chat_text(request.chat.turns)
        elif kind == "raw":
            text = request.raw.text
        else:
            raise InvalidRequest("the request has no prompt (chat or raw)")
        pieces = text.split(BOI)
        if len(pieces) - 1 != len(crops):
            raise InvalidRequest(f"the prompt has {len(pieces) - 1} image placeholders but {len(crops)} images")
        if crops and self.mm_tokens is None:
            raise InvalidRequest("this model is text-only: it takes no images")
        if SOFT in text or EOI in text:
            raise InvalidRequest(f"the prompt may not contain {SOFT} or {EOI}; images go in image parts")
        text = pieces[0] + "".join(self._expand(c) + rest for c, rest in zip(crops, pieces[1:]))
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if kind == "raw" and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        types = (np.asarray(ids) == self.soft_id).astype(np.int32)
        return ids, types
