"""A small tokenizer.json with Gemma 3's special tokens, built with the tokenizers library."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
           "<end_of_image>", "<image_soft_token>"]
CORPUS = ["What is in this image? A red circle on a blue background. How many shapes are there? Two.",
          "Where is the square? In the top left corner. What colour is the triangle? Green.",
          "Crème brûlée, naïve café: déjà vu! 日本語 🙂"]


def build(vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def write(path: str, vocab_size: int = 320) -> Tokenizer:
    """tokenizer.json + tokenizer_config.json in ``path``; returns the tokenizer."""
    tok = build(vocab_size)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                   "image_token": "<image_soft_token>", "add_bos_token": True}, f)
    return tok
