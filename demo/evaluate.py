"""Held-out accuracy of the demo model: ``python -m demo.evaluate --model demo/model --n 500 --seed 12345``.

Scenes come from the "eval" seed stream, never used in training; question kinds take turns (so each
kind gets n/5 questions) and each question a random wording. Answers are generated greedily through
our library, batched, and compared exactly with the generator's answers. The prompts are left-padded
to one length and the batch to one size, so the whole run compiles one prefill and one decode step.
Exit code 1 when the accuracy is under ``--min-accuracy``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np

from demo import MODEL_DIR, shapes
from demo.tokenizer import user_turn
from gemma3 import Gemma3ForConditionalGeneration
from gemma3.processing import Gemma3Processor

PROMPT_LEN = 32  # the longest prompt is 30 tokens
MAX_NEW_TOKENS = 16  # the longest answer is 14 tokens, then <end_of_turn>


@dataclasses.dataclass
class Result:
    correct: dict[str, int]
    total: dict[str, int]
    failures: list[tuple[str, str, str]]  # (question, expected, got)

    @property
    def accuracy(self) -> float:
        return sum(self.correct.values()) / max(sum(self.total.values()), 1)

    def kind_accuracy(self, kind: str) -> float:
        return self.correct[kind] / max(self.total[kind], 1)

    def report(self) -> str:
        lines = [f"{kind:9s} {self.correct[kind]:4d}/{self.total[kind]:<4d} {self.kind_accuracy(kind):.1%}"
                 for kind in self.total]
        lines.append(f"{'overall':9s} {sum(self.correct.values()):4d}/{sum(self.total.values()):<4d} "
                     f"{self.accuracy:.1%}")
        return "\n".join(lines)


def held_out(n: int, seed: int) -> list[tuple[shapes.Scene, shapes.QA]]:
    """n (scene, question) pairs from the held-out stream; kinds in turn, targets and wordings at random."""
    out = []
    for i in range(n):
        scene = shapes.scene_for(i, "eval", seed)
        rng = np.random.default_rng([seed, i])
        kind = shapes.KINDS[i % len(shapes.KINDS)]
        options = [qa for qa in shapes.question_set(scene, rng) if qa.kind == kind]
        out.append((scene, options[int(rng.integers(len(options)))]))
    return out


def prompt_inputs(processor: Gemma3Processor, images, questions, length: int = PROMPT_LEN) -> dict[str, np.ndarray]:
    """The serving stack's prompts for (image, question) pairs, left-padded to ``length`` tokens."""
    texts = [processor.apply_chat_template(user_turn(q)) for q in questions]
    inputs = processor(texts, [[image] for image in images], add_special_tokens=False)
    extra = length - inputs["input_ids"].shape[1]
    if extra < 0:
        raise ValueError(f"a prompt has {inputs['input_ids'].shape[1]} tokens, more than {length}")
    pad = ((0, 0), (extra, 0))
    return {"input_ids": np.pad(inputs["input_ids"], pad, constant_values=processor.pad_token_id),
            "attention_mask": np.pad(inputs["attention_mask"], pad),
            "token_type_ids": np.pad(inputs["token_type_ids"], pad), "pixel_values": inputs["pixel_values"]}


def answer_ids(model: Gemma3ForConditionalGeneration, processor: Gemma3Processor, images, questions,
               batch_size: int = 100) -> list[list[int]]:
    """Greedy answers as token ids up to and including the stop token, in batches of one fixed size
    (the last filled up with copies), so that every call reuses the same compiled shapes."""
    out = []
    for start in range(0, len(questions), batch_size):
        chunk_images = list(images[start:start + batch_size])
        chunk_questions = list(questions[start:start + batch_size])
        n = len(chunk_questions)
        chunk_images += chunk_images[:1] * (batch_size - n)
        chunk_questions += chunk_questions[:1] * (batch_size - n)
        inputs = prompt_inputs(processor, chunk_images, chunk_questions)
        gen = model.generate(inputs.pop("input_ids"), inputs.pop("attention_mask"), max_new_tokens=MAX_NEW_TOKENS,
                             **inputs)
        out += [[int(t) for t in row[:count]] for row, count in zip(gen.new_tokens[:n], gen.num_new_tokens[:n])]
    return out


def answer(model: Gemma3ForConditionalGeneration, processor: Gemma3Processor, images, questions,
           batch_size: int = 100) -> list[str]:
    """Greedy answers as text (the stop token and any special token left out)."""
    return [processor.tokenizer.decode(ids, skip_special_tokens=True)
            for ids in answer_ids(model, processor, images, questions, batch_size)]


def evaluate(model: Gemma3ForConditionalGeneration, processor: Gemma3Processor, n: int = 500, seed: int = 12345,
             batch_size: int = 100) -> Result:
    pairs = held_out(n, seed)
    got = answer(model, processor, [shapes.render(scene) for scene, _ in pairs], [qa.question for _, qa in pairs],
                 batch_size)
    correct, total, failures = dict.fromkeys(shapes.KINDS, 0), dict.fromkeys(shapes.KINDS, 0), []
    for (_, qa), text in zip(pairs, got):
        total[qa.kind] += 1
        if text == qa.answer:
            correct[qa.kind] += 1
        else:
            failures.append((qa.question, qa.answer, text))
    return Result(correct, total, failures)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL_DIR)
    p.add_argument("--n", type=int, default=500, help="number of held-out questions")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--min-accuracy", type=float, default=0.0, help="exit with 1 below this accuracy (0..1)")
    args = p.parse_args(argv)
    start = time.time()
    model = Gemma3ForConditionalGeneration.from_pretrained(args.model)
    processor = Gemma3Processor.from_pretrained(args.model)
    result = evaluate(model, processor, args.n, args.seed, args.batch_size)
    for question, expected, got in result.failures[:10]:
        print(f"wrong: {question!r}: expected {expected!r}, got {got!r}")
    print(result.report())
    print(f"{time.time() - start:.0f}s")
    return 0 if result.accuracy >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
