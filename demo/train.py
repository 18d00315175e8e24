"""Train the demo model with our own library: ``python -m demo.train --out demo/model [--steps N --seed S]``.

The model is ``gemma3.Gemma3ForConditionalGeneration`` and the loss its own (``labels``, -100 on the
prompt, so only the answer and its ``<end_of_turn>`` are learned). Every example is built by
``gemma3.processing.Gemma3Processor`` exactly as the serving stack builds a request: the Gemma 3 chat
template with the image then the question in the user turn, each image expanded into its soft tokens;
the model turn is the answer then ``<end_of_turn>``.

Data are generated on the fly, deterministically: batch ``i`` holds the training scenes
``i * images_per_batch ...`` of the seed's stream (``demo.shapes.scene_for``), so a run sees fresh
images at every step yet the same ones on every run, and the host prepares the next batch while the
device runs the jitted step (one shape: fixed batch and sequence length). Each image is asked several
questions in one batch, and its SigLIP features are computed once and shared by them
(``image_features=``), which roughly halves the cost of a step on CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from demo import shapes
from demo.tokenizer import build_tokenizer, token_ids, user_turn, write_processor_files
from gemma3 import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
from gemma3.config import FULL, SLIDING
from gemma3.processing import Gemma3ImageProcessor, Gemma3Processor

IMAGE_SEQ_LENGTH = 9  # 6x6 patches pooled 2x2: one image token per cell of the scenes' 3x3 grid
SEQ_LEN = 44  # the longest example: a two-shape description, 28 prompt + 16 answer tokens
# How often each kind of question is asked once the curriculum is through. Descriptions list the
# objects in reading order, but "where is the triangle?" and "what shape is in the top left?" must
# pick one object of two by the other attribute: that binding is the slowest thing to learn, hence
# their weight and the two-shape scenes' share in training (the held-out scenes are half and half).
KIND_WEIGHTS = {"describe": 0.25, "count": 0.05, "colour": 0.2, "where": 0.25, "shape": 0.25}
P_TWO = 0.7
# The curriculum, as (end of the stage as a fraction of the steps, question kinds, probability of two
# shapes, scene difficulty at the stage's start and end; see shapes.random_scene). Why: trained on the
# final distribution from the start, the model learns the answers' grammar and priors within 100
# steps and then ignores the image for many hundreds more (a small shape on a varied background hardly
# changes the image tokens, so the gradient towards looking at them is tiny). A big shape on plain
# grey makes the colour visible at once; once the decoder reads the image, position and shape follow,
# then sizes shrink, backgrounds vary and second shapes appear until the data are the real distribution.
CURRICULUM = (
    (0.025, {"colour": 1.0}, 0.0, 0.0, 0.0),
    (0.15, {"colour": 1.0, "where": 1.0, "shape": 1.0}, 0.0, 0.0, 0.0),
    (0.35, KIND_WEIGHTS, P_TWO, 0.0, 1.0),
    (1.0, KIND_WEIGHTS, P_TWO, 1.0, 1.0),
)


def model_config(tok) -> Gemma3Config:
    """Tiny, but every Gemma 3 feature the serving stack meets: sliding and global layers (a window
    shorter than a prompt), GQA, final-logit softcapping, bidirectional image blocks, two stop tokens."""
    ids = token_ids(tok)
    text = Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=32, layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=30.0,
        max_position_embeddings=1024, pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], torch_dtype="float32",
    )
    vision = SiglipVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                                image_size=shapes.IMAGE_SIZE, patch_size=16)
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_SEQ_LENGTH,
                        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                        image_token_index=ids["<image_soft_token>"], torch_dtype="float32")


class Batches:
    """Deterministic training batches: ``batch(i)`` is always the same arrays for the same seed."""

    def __init__(self, processor: Gemma3Processor, seed: int, images_per_batch: int, questions_per_image: int,
                 steps: int, seq_len: int = SEQ_LEN):
        self.processor, self.seed, self.steps = processor, seed, steps
        self.images_per_batch, self.questions_per_image, self.seq_len = images_per_batch, questions_per_image, seq_len
        self.kinds = list(KIND_WEIGHTS)
        self._prompt_lengths: dict[str, int] = {}

    def stage(self, i: int) -> tuple[np.ndarray, float, float]:
        """Step i's question-kind probabilities, probability of two shapes and scene difficulty."""
        start = 0.0
        for end, weights, p_two, d0, d1 in CURRICULUM:
            if i < end * self.steps or end == 1.0:
                w = np.asarray([weights.get(k, 0.0) for k in self.kinds])
                progress = (i / self.steps - start) / (end - start)
                return w / w.sum(), p_two, d0 + (d1 - d0) * min(max(progress, 0.0), 1.0)
            start = end
        raise AssertionError("the curriculum ends at 1.0")

    def prompt_length(self, question: str) -> int:
        """Tokens before the answer (the loss starts there), cached per question."""
        if question not in self._prompt_lengths:
            prompt = self.processor.expand_images(self.processor.apply_chat_template(user_turn(question)), [0])
            self._prompt_lengths[question] = len(self.processor.tokenizer.encode(prompt, add_special_tokens=False).ids)
        return self._prompt_lengths[question]

    def examples(self, i: int):
        """The batch's (image, question, answer) triples: each image followed by its questions."""
        out = []
        weights, p_two, difficulty = self.stage(i)
        for j in range(self.images_per_batch):
            scene = shapes.scene_for(i * self.images_per_batch + j, "train", self.seed, p_two, difficulty)
            rng = np.random.default_rng([self.seed, i, j])
            qas = shapes.question_set(scene, rng)
            image = shapes.render(scene)
            for kind in rng.choice(self.kinds, self.questions_per_image, p=weights):
                options = [qa for qa in qas if qa.kind == kind]
                qa = options[int(rng.integers(len(options)))]
                out.append((image, qa.question, qa.answer))
        return out

    def batch(self, i: int) -> dict[str, np.ndarray]:
        examples = self.examples(i)
        texts = [self.processor.apply_chat_template(user_turn(q)) + a + "<end_of_turn>" for _, q, a in examples]
        images = [ex[0] for ex in examples[::self.questions_per_image]]
        # Each image once for the pixels; the token ids of every example through the processor.
        inputs = self.processor(texts, [[image] for image, _, _ in examples], add_special_tokens=False,
                                padding_side="right")
        pixels = self.processor.image_processor(images)["pixel_values"]
        n, t = inputs["input_ids"].shape
        if t > self.seq_len:
            raise ValueError(f"an example has {t} tokens, more than the sequence length {self.seq_len}")
        pad = ((0, 0), (0, self.seq_len - t))
        ids = np.pad(inputs["input_ids"], pad, constant_values=self.processor.pad_token_id)
        mask, types = np.pad(inputs["attention_mask"], pad), np.pad(inputs["token_type_ids"], pad)
        starts = np.asarray([self.prompt_length(q) for _, q, _ in examples])
        answer = (np.arange(self.seq_len)[None, :] >= starts[:, None]) & (mask == 1)
        labels = np.where(answer, ids, -100)
        return {"pixel_values": pixels, "input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                "token_type_ids": types.astype(np.int32), "labels": labels.astype(np.int32)}


def make_optimizer(steps: int, peak_lr: float, warmup: int) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay, gradients clipped; no weight decay on norms and biases."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, steps, end_value=peak_lr * 0.02)
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01, mask=decay))


def make_train_step(graphdef, tx, questions_per_image: int):
    """One jitted step on (params, optimizer state); the image features are shared by each image's questions."""

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        features = jnp.repeat(model.get_image_features(batch["pixel_values"]), questions_per_image, axis=0)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], image_features=features, labels=batch["labels"])
        return out.loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def save(model: Gemma3ForConditionalGeneration, tok, out: str) -> None:
    """The checkpoint (transformers 5 layout) with everything a server or transformers needs next to it."""
    model.save_pretrained(out)
    os.chmod(os.path.join(out, "model.safetensors"), 0o644)  # safetensors 0.8 writes 0600 (a temp file renamed)
    write_processor_files(out, tok, shapes.IMAGE_SIZE, IMAGE_SEQ_LENGTH)
    text = model.config.text_config
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                   "pad_token_id": text.pad_token_id, "do_sample": False}, f, indent=2)
        f.write("\n")


def train(out: str, steps: int = 6000, seed: int = 0, images_per_batch: int = 16, questions_per_image: int = 2,
          peak_lr: float = 5e-4, warmup: int = 50, log_every: int = 100) -> Gemma3ForConditionalGeneration:
    tok = build_tokenizer()
    config = model_config(tok)
    processor = Gemma3Processor(tok, Gemma3ImageProcessor(size={"height": shapes.IMAGE_SIZE,
                                                                "width": shapes.IMAGE_SIZE}), IMAGE_SEQ_LENGTH)
    model = Gemma3ForConditionalGeneration(config, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params:,} parameters; {steps} steps of {images_per_batch} images x {questions_per_image} "
          f"questions", flush=True)
    tx = make_optimizer(steps, peak_lr, warmup)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, questions_per_image)
    batches = Batches(processor, seed, images_per_batch, questions_per_image, steps)

    start, losses, nxt = time.time(), [], batches.batch(0)
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in nxt.items()}
        params, opt_state, loss = step(params, opt_state, batch)  # runs while the next batch is built
        if i + 1 < steps:
            nxt = batches.batch(i + 1)
        losses.append(loss)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            recent = float(np.mean(jax.device_get(losses[-log_every:])))
            elapsed = time.time() - start
            print(f"step {i + 1}/{steps}  loss {recent:.4f}  {elapsed:.0f}s  "
                  f"(eta {elapsed / (i + 1) * (steps - i - 1):.0f}s)", flush=True)
            if not math.isfinite(recent):
                raise FloatingPointError("the loss is not finite")
    nnx.update(model, params)
    save(model, tok, out)
    print(f"saved {out} after {time.time() - start:.0f}s", flush=True)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo/model", help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images-per-batch", type=int, default=16)
    p.add_argument("--questions-per-image", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    args = p.parse_args(argv)
    train(args.out, args.steps, args.seed, args.images_per_batch, args.questions_per_image, args.lr, args.warmup)


if __name__ == "__main__":
    main()
