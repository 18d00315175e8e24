"""The EasyDeL 0.3.0 peer of bench/model.py: one worker, the same JSON-lines protocol as its other workers.

Runs only in EasyDeL's own virtual environment (it pins its own jax and transformers; made by
bench/setup_easydel.sh); bench/model.py's worker imports this module when started with ``--_worker easydel``.

* Load: ``AutoEasyDeLModelForCausalLM.from_pretrained(ckpt, dtype=d, param_dtype=d, from_torch=True)``, EasyDeL's
  converter for a transformers checkpoint directory (the bench's float32 safetensors, cast to ``d`` on load),
  on its default mesh (every device on the fsdp axis: here the one CPU device). EasyDeL reads the rope bases from
  ``rope_theta`` / ``rope_local_base_freq``, which transformers 5 no longer writes (it writes ``rope_parameters``),
  so they are checked against the checkpoint here.
* Generate: ``model.generate(ids, generation_config=GenerationConfig(do_sample=False, max_new_tokens=n,
  eos_token_id=None))`` (greedy, exactly n new tokens: no stop token), traced by EasyDeL as one forward of the
  prompt then a ``lax.while_loop`` of decode steps, run as one ``jax.jit`` over the ``nnx.split`` state (compiled
  once, by the cold call; without it every call retraces the model). Calls run inside ``with model.mesh:``.
* Prefill: what that generate runs first, jitted alone: one forward of the prompt filling a fresh KV cache
  (``prepare_inputs_for_generation``'s cache, made before the timer starts, as ours does), returning the
  last-position logits and the cache. Unlike ours and transformers (``logits_to_keep=1``), EasyDeL's forward
  computes the LM head for EVERY prompt position (B x prompt_len x vocab), as its generate does; so this prefill
  costs more than theirs, and generate - prefill stays its decode time.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from model import prompt_ids  # bench/model.py: this directory is sys.path[0] in the worker process


class EasyDeLWorker:
    """EasyDeL 0.3.0 (JAX/Flax NNX)."""

    def __init__(self, ckpt, dtype, batch, prompt_len, new_tokens, seed):
        import easydel as ed
        import jax
        import jax.numpy as jnp
        from flax import nnx
        from transformers import GenerationConfig

        self.jax = jax
        jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
        t0 = time.perf_counter()
        model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(ckpt, dtype=jdtype, param_dtype=jdtype,
                                                                from_torch=True, verbose=False)
        jax.block_until_ready(nnx.state(model))
        self.load_s = time.perf_counter() - t0
        check_rope(model.config, ckpt)
        self.batch, self.t, self.n = batch, prompt_len, new_tokens
        self.ids = jnp.asarray(prompt_ids(batch, prompt_len, model.config.vocab_size, seed), jnp.int32)
        # generate falls back to model.generation_config for a None eos_token_id: set it there too (before the split,
        # as it is a static attribute of the graph).
        gc = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, pad_token_id=0, bos_token_id=2,
                              eos_token_id=None)
        model.generation_config = gc
        self.mesh = model.mesh
        graphdef, self.state = nnx.split(model)
        t, total = prompt_len, prompt_len + new_tokens

        @jax.jit
        def generate(state, ids):
            m = nnx.merge(graphdef, state)
            return m.generate(ids, generation_config=gc).sequences[:, t:]

        @jax.jit
        def fresh_cache(state, ids):
            m = nnx.merge(graphdef, state)
            return m.prepare_inputs_for_generation(ids, max_length=total, pad_token_id=0)

        @jax.jit
        def prefill(state, ids, kwargs):  # what generate's first step runs (its _greedy_search body on the prompt)
            m = nnx.merge(graphdef, state)
            out = m._call_generation_model_step(m, ids, dict(kwargs))
            return out.logits[:, -1], out.past_key_values

        self._generate, self._fresh_cache, self._prefill = generate, fresh_cache, prefill
        self.info = {"easydel": ed.__version__, "jax": jax.__version__, "backend": jax.default_backend(),
                     "devices": str(jax.devices())}

    def generate(self):
        with self.mesh:
            t0 = time.perf_counter()
            new = np.asarray(self._generate(self.state, self.ids))
            dt = time.perf_counter() - t0
        assert new.shape == (self.batch, self.n), new.shape
        return dt, new

    def cold(self):
        dt, _ = self.generate()  # compiles generate
        with self.mesh:  # and the prefill pair, outside the timed repeats
            self.jax.block_until_ready(self._prefill(self.state, self.ids, self._fresh_cache(self.state, self.ids)))
        return {"cold_generate_s": dt}

    def prefill(self):
        with self.mesh:
            kwargs = self.jax.block_until_ready(self._fresh_cache(self.state, self.ids))
            t0 = time.perf_counter()
            out = self.jax.block_until_ready(self._prefill(self.state, self.ids, kwargs))
            return time.perf_counter() - t0, out

    def repeat(self, step_loop=False):
        gen_s, new = self.generate()
        return {"generate_s": gen_s, "tokens": new.tolist()}


def check_rope(config, ckpt) -> None:
    """Fail unless EasyDeL's per-layer-type rope bases are the checkpoint's (see the module docstring)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        want = json.load(f).get("rope_parameters") or {}
    for kind, params in want.items():
        got = config.rope_parameters.get(kind, {}).get("rope_theta")
        if got != params.get("rope_theta"):
            raise ValueError(f"EasyDeL {kind} rope_theta {got} != checkpoint's {params.get('rope_theta')}")
