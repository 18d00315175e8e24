"""The LM worker: the sharded Gemma 3 decoder behind continuous batching."""
