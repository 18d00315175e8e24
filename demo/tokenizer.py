"""A small tokenizer with Gemma 3's special tokens and Gemma's text pipeline, and the processor files a
checkpoint directory needs (what ``gemma3.processing.Gemma3Processor.from_pretrained`` and transformers'
``AutoProcessor`` read).

Why Gemma's pipeline (spaces as "▁", BPE with byte fallback, <bos> added by the post-processor):
transformers' ``GemmaTokenizer`` keeps only tokenizer.json's vocabulary, merges, added tokens and
post-processor and rebuilds the rest as Gemma's, so only this pipeline tokenizes the same in our
processor and in transformers. Byte fallback (the 256 ``<0xNN>`` tokens) makes any text encodable
and decodable exactly; the learned merges cover the demo's words, so its questions and answers are a
few tokens each. Merges are learned within words (split before "▁", newlines and punctuation kept
apart), so no merge spans two words and the saved, unsplit Gemma pipeline gives the same tokens.
"""

from __future__ import annotations

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from demo import shapes

# Gemma's first five, in Gemma's order, then the chat and image tokens.
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>")
BYTE_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))

# google/gemma-3-4b-it's tokenizer_config.json "chat_template", verbatim (tests/test_processing.py checks
# our apply_chat_template against transformers' rendering of it).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def user_turn(question: str) -> list[dict]:
    """The chat the serving stack builds for one image and a question (the client's order: image first)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def corpus() -> list[str]:
    """Every word the demo asks and answers, and the chat template's own words."""
    lines = ["user\n", "model\n", "\n\n", *shapes.NUMBERS.values(), *shapes.SHAPES, *shapes.COLOURS,
             *shapes.POSITIONS]  # answers start a turn: no "▁" before their first word
    for wording in (w for wordings in shapes.QUESTIONS.values() for w in wordings):
        lines += [wording.format(shape=s, position=p) for s in shapes.SHAPES for p in shapes.POSITIONS]
    for s in shapes.SHAPES:
        for c in shapes.COLOURS:
            lines += [shapes.ShapeSpec(s, c, p).description() for p in shapes.POSITIONS]
    lines += [shapes.describe(shapes.scene_for(i, "train")) for i in range(200)]
    return lines


def build_tokenizer() -> Tokenizer:
    """Special tokens (ids 0-9), the 256 byte tokens, then the demo's characters and learned merges."""
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Split(Regex("\n+"), "isolated"),
        pre_tokenizers.Split(Regex("[^\\w▁\n]"), "isolated"),
    ])
    trainer = trainers.BpeTrainer(vocab_size=10_000, min_frequency=1, show_progress=False, special_tokens=[])
    trainer_tok.train_from_iterator(corpus(), trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *BYTE_TOKENS, *pieces])}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")  # GemmaTokenizer's (a no-op after "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B:1",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    return tok


def token_ids(tok: Tokenizer) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_processor_files(path: str | os.PathLike, tok: Tokenizer, image_size: int, image_seq_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template), chat_template.json,
    preprocessor_config.json (Gemma 3's image processor at ``image_size``) and processor_config.json."""
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    files = {
        "tokenizer_config.json": {
            "tokenizer_class": "GemmaTokenizer", "processor_class": "Gemma3Processor",
            "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
            "mask_token": "<mask>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>", "add_bos_token": True, "add_eos_token": False,
            "padding_side": "left", "model_max_length": 1024, "chat_template": GEMMA3_CHAT_TEMPLATE,
        },
        "chat_template.json": {"chat_template": GEMMA3_CHAT_TEMPLATE},
        "processor_config.json": {"processor_class": "Gemma3Processor", "image_seq_length": image_seq_length},
        "preprocessor_config.json": {
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": image_size, "width": image_size}, "resample": 2, "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "do_convert_rgb": True, "do_pan_and_scan": False,
            "image_seq_length": image_seq_length,
        },
    }
    for name, content in files.items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
