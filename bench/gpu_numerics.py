"""Our logits on this machine's accelerator against transformers (float32, CPU) on tiny random checkpoints.

    python bench/gpu_numerics.py [--checkpoints DIR]   # DIR from tests/make_checkpoints.py; made if missing

The test suite checks parity on CPU only (CI has no GPU). On a GPU, XLA may run float32 products
at a lower default precision (TF32 on Hopper), so this prints the largest logit error there for
float32 at JAX's default precision, float32 at "highest", and bfloat16 weights, with the greedy
20-token continuation compared token by token against transformers' generate.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoints", default="/tmp/gemma3-numerics-checkpoints")
    args = p.parse_args(argv)
    if not os.path.exists(os.path.join(args.checkpoints, "base", "reference.npz")):
        from tests import make_checkpoints

        make_checkpoints.main(args.checkpoints)

    import jax
    import jax.numpy as jnp

    from gemma3 import Gemma3ForCausalLM
    from tests import make_checkpoints as mk
    from tests.helpers import max_error_on_mask

    device = jax.devices()[0]
    print(f"Device: {device.device_kind} ({device.platform}); jax {jax.__version__}. Largest |logit error| over "
          "the unpadded positions against transformers float32 on CPU; greedy: tokens of 2 x 20 equal to "
          "transformers' generate.\n")
    print("| checkpoint | logit std | float32 (default precision) | float32 (highest) | bfloat16 | "
          "greedy float32 | greedy bfloat16 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for variant in mk.VARIANTS:
        path = os.path.join(args.checkpoints, variant)
        ref = np.load(os.path.join(path, "reference.npz"))
        ids, mask = ref["input_ids"], ref["attention_mask"]
        pos = jnp.asarray(mk.hf_positions(mask))
        row = [variant, f"{ref['logits'][mask.astype(bool)].std():.2f}"]
        greedy = []
        for dtype, precision in ((jnp.float32, "default"), (jnp.float32, "highest"), (jnp.bfloat16, "default")):
            model = Gemma3ForCausalLM.from_pretrained(path, dtype=dtype)
            with jax.default_matmul_precision(precision):
                logits = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), position_ids=pos).logits
                row.append(f"{max_error_on_mask(logits, ref['logits'], mask):.2e}")
                if precision == "default":
                    out = model.generate(ids, mask, max_new_tokens=20, eos_token_id=[])
                    new = np.asarray(out.sequences)[:, ids.shape[1]:]
                    greedy.append(f"{int((new == ref['greedy'][:, ids.shape[1]:]).sum())}/{new.size}")
        print("| " + " | ".join(row + greedy) + " |", flush=True)


if __name__ == "__main__":
    main()
