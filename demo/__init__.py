"""The project's demo model: a tiny Gemma 3 (SigLIP + decoder) trained with our own library on synthetic
images of coloured shapes, so that the serving stack has a checkpoint that really answers questions.

- ``demo.shapes``: the deterministic scene generator, its questions and exact answers.
- ``demo.tokenizer``: a small Gemma-style tokenizer and the processor files next to the checkpoint.
- ``demo.train``: ``python -m demo.train --out demo/model`` (about 15 minutes on 2 CPU cores).
- ``demo.evaluate``: ``python -m demo.evaluate --model demo/model`` (held-out exact-match accuracy).

``MODEL_DIR`` is the shipped checkpoint, in the Hugging Face layout transformers loads too.
"""

import os

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
EXAMPLE_IMAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "example.png")
