"""Gemma3TextConfig reads both config.json styles and rejects what it cannot honour, by name."""

import json

import pytest

from gemma3 import ConfigError, Gemma3TextConfig
from gemma3.config import FULL, SLIDING

GEMMA_3_1B_HUB = {  # google/gemma-3-1b-it's config.json, as published
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None,
    "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}


def test_published_style():
    c = Gemma3TextConfig.from_dict(GEMMA_3_1B_HUB)
    assert c.layer_types[:6] == [SLIDING] * 5 + [FULL] and c.layer_types.count(FULL) == 4
    assert c.rope(FULL) == (1_000_000.0, 1.0) and c.rope(SLIDING) == (10_000.0, 1.0)
    assert c.eos_token_ids == [1, 106] and c.num_kv_groups == 4 and c.torch_dtype == "bfloat16"


def test_transformers5_style_equals_published_style_after_a_round_trip(tmp_path):
    import transformers

    hf = transformers.Gemma3TextConfig(**{k: v for k, v in GEMMA_3_1B_HUB.items()
                                          if k not in ("architectures", "model_type", "transformers_version")})
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "layer_types" in written
    a, b = Gemma3TextConfig.from_pretrained(tmp_path), Gemma3TextConfig.from_dict(GEMMA_3_1B_HUB)
    assert a.layer_types == b.layer_types
    assert a.rope(FULL) == b.rope(FULL) and a.rope(SLIDING) == b.rope(SLIDING)


def test_linear_rope_scaling_applies_to_full_layers_only():
    c = Gemma3TextConfig.from_dict({"rope_scaling": {"rope_type": "linear", "factor": 8.0}, "num_hidden_layers": 6})
    assert c.rope(FULL) == (1_000_000.0, 8.0) and c.rope(SLIDING) == (10_000.0, 1.0)
    old = Gemma3TextConfig.from_dict({"rope_scaling": {"type": "linear", "factor": 8.0}})
    assert old.rope(FULL) == (1_000_000.0, 8.0)


def test_sparse_config_uses_transformers_defaults():
    c = Gemma3TextConfig.from_dict({"model_type": "gemma3_text"})
    assert (c.hidden_size, c.num_hidden_layers, c.sliding_window, c.vocab_size) == (2304, 26, 4096, 262208)


def test_multimodal_config_yields_its_text_half():
    c = Gemma3TextConfig.from_dict({"model_type": "gemma3", "text_config": {"hidden_size": 2560,
                                    "num_hidden_layers": 34}, "vision_config": {}})
    assert c.hidden_size == 2560 and len(c.layer_types) == 34


@pytest.mark.parametrize("change, message", [
    ({"hidden_activation": "relu"}, "hidden_activation 'relu' is not supported"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "must be a multiple of num_key_value_heads"),
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types has 3 entries but num_hidden_layers is 26"),
    ({"layer_types": ["chunked_attention"] * 26}, "unknown layer_types"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs factor >= 1"),
    ({"sliding_window": None}, "sliding_window must be a positive integer"),
    ({"hidden_size": -4}, "hidden_size must be a positive integer"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"attention_bias": True}, "attention_bias"),
    ({"sliding_window_pattern": 0}, "sliding_window_pattern must be a positive integer"),
    ({"final_logit_softcapping": -1.0}, "final_logit_softcapping must be > 0"),
])
def test_inconsistent_values_get_a_clear_error(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Gemma3TextConfig.from_dict(change)


GEMMA_3_4B_HUB = {  # google/gemma-3-4b-it's config.json, as published (sparse text_config)
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def test_multimodal_published_config():
    from gemma3 import Gemma3Config

    c = Gemma3Config.from_dict(GEMMA_3_4B_HUB)
    t, v = c.text_config, c.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (2560, 34, 8, 4)
    assert t.vocab_size == 262208 and t.sliding_window == 1024 and t.rope(FULL) == (1_000_000.0, 8.0)
    assert (v.num_patches, c.tokens_per_side, c.image_token_id) == (4096, 16, 262144)


def test_multimodal_config_errors():
    from gemma3 import Gemma3Config

    with pytest.raises(ConfigError, match="perfect square"):
        Gemma3Config.from_dict({**GEMMA_3_4B_HUB, "mm_tokens_per_image": 250})
    with pytest.raises(ConfigError, match="does not pool evenly"):
        Gemma3Config.from_dict({**GEMMA_3_4B_HUB, "mm_tokens_per_image": 25 * 25})
    with pytest.raises(ConfigError, match="neither text_config nor vision_config"):
        Gemma3Config.from_dict({"hidden_size": 8})
    with pytest.raises(ConfigError, match="image_size .* must be a multiple of patch_size"):
        Gemma3Config.from_dict({**GEMMA_3_4B_HUB, "vision_config": {"image_size": 900, "patch_size": 14}})
