"""``gemma3-generate``: greedy or sampled generation from a checkpoint directory, token ids in and out."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def tiny_random_config():
    """A small Gemma 3 text model with both layer kinds, GQA and softcapping, for smoke runs."""
    from gemma3.config import Gemma3TextConfig

    return Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            layer_types=["sliding_attention", "sliding_attention", "sliding_attention",
                                         "full_attention"],
                            query_pre_attn_scalar=16, final_logit_softcapping=30.0, max_position_embeddings=512)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True, help="Hugging Face Gemma 3 checkpoint directory")
    p.add_argument("--init-random", action="store_true",
                   help="first write a tiny random checkpoint there if the directory has none")
    p.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tensor-parallel", type=int, default=1, help="size of the mesh's tensor axis")
    args = p.parse_args(argv)

    import jax.numpy as jnp
    from flax import nnx

    from gemma3.sharding import create_mesh
    from gemma3.text import Gemma3ForCausalLM

    if args.init_random and not os.path.exists(os.path.join(args.checkpoint, "config.json")):
        Gemma3ForCausalLM(tiny_random_config(), rngs=nnx.Rngs(0)).save_pretrained(args.checkpoint)
        print(f"wrote a tiny random checkpoint to {args.checkpoint}", file=sys.stderr)
    mesh = create_mesh(tensor=args.tensor_parallel, data=-1) if args.tensor_parallel > 1 else None
    t0 = time.perf_counter()
    model = Gemma3ForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(jnp, args.dtype), mesh=mesh)
    t1 = time.perf_counter()
    ids = [[int(x) for x in args.prompt_ids.split(",")]]
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, mesh=mesh)
    t2 = time.perf_counter()
    n = int(out.num_new_tokens[0])
    print(json.dumps({"prompt_ids": ids[0], "new_token_ids": out.new_tokens[0, :n].tolist(),
                      "load_s": round(t1 - t0, 3), "generate_s": round(t2 - t1, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
