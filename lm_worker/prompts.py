"""Prompts for the LM worker: the Gemma 3 chat template, image placeholders expanded into soft
tokens as transformers' ``Gemma3Processor`` does, and tokenization with the checkpoint's tokenizer.json.
"""

from __future__ import annotations

import json
import os

import numpy as np
from tokenizers import Tokenizer

from gemma3.processing import EOI, IMAGE_TOKEN, Gemma3Processor, apply_chat_template


class InvalidRequest(ValueError):
    """Bad input (prompt or sampling): answered with INVALID_ARGUMENT and this message."""


ROLES = {"system": "system", "user": "user", "assistant": "assistant", "model": "assistant"}


def chat_text(turns) -> str:
    """The chat's prompt text through gemma3.processing's chat template (generation prompt included)."""
    messages = []
    for i, turn in enumerate(turns):
        role = ROLES.get(turn.role)
        if role is None or (role == "system" and i > 0):
            raise InvalidRequest(f"turn {i}: role {turn.role!r} is not allowed there (system first, then user and "
                                 "assistant)")
        messages.append({"role": role, "content": [
            {"type": "image"} if p.WhichOneof("part") == "image" else {"type": "text", "text": p.text}
            for p in turn.parts]})
    if messages and messages[0]["role"] == "system" and not messages[0]["content"]:
        messages[0]["content"] = ""
    try:
        return apply_chat_template(messages)
    except ValueError as e:
        raise InvalidRequest(str(e)) from None


class PromptBuilder:
    """Turns an LMGenerateRequest into token ids and token types (1 at image soft tokens)."""

    def __init__(self, tokenizer: Tokenizer, mm_tokens_per_image: int | None, hidden_size: int,
                 stop_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.mm_tokens = mm_tokens_per_image
        self.embedding_shape = (mm_tokens_per_image, hidden_size) if mm_tokens_per_image else None
        self.stop_token_ids = stop_token_ids
        self.bos_id = tokenizer.token_to_id("<bos>")
        self.soft_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.processor = Gemma3Processor(tokenizer, image_seq_length=mm_tokens_per_image or 0)

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

    def build(self, request, crops: list[int]) -> tuple[list[int], np.ndarray]:
        """``crops``: pan-and-scan crops per image of the request (0 without)."""
        kind = request.WhichOneof("prompt")
        if kind == "chat":
            text = chat_text(request.chat.turns)
        elif kind == "raw":
            text = request.raw.text
        else:
            raise InvalidRequest("the request has no prompt (chat or raw)")
        if crops and self.mm_tokens is None:
            raise InvalidRequest("this model is text-only: it takes no images")
        if IMAGE_TOKEN in text or EOI in text:
            raise InvalidRequest(f"the prompt may not contain {IMAGE_TOKEN} or {EOI}; images go in image parts")
        try:
            text = self.processor.expand_images(text, crops)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if kind == "raw" and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        types = (np.asarray(ids) == self.soft_id).astype(np.int32)
        return ids, types
