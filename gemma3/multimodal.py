"""Images into the text decoder: the projector, ``Gemma3Model`` and ``Gemma3ForConditionalGeneration``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gemma3 import cache as kv
from gemma3.config import Gemma3Config
from gemma3.outputs import ModelOutput, output_class
from gemma3.text import CausalLMMixin, Gemma3RMSNorm, Gemma3TextModel, PretrainedMixin, _linear, float32_precision
from gemma3.vision import SiglipVisionModel


class Gemma3MultiModalProjector(nnx.Module):
    """Patch grid → average-pooled to ``mm_tokens_per_image`` → RMSNorm → into the text width."""

    def __init__(self, config: Gemma3Config, *, dtype, rngs: nnx.Rngs):
        v, t = config.vision_config, config.text_config
        self.patches_per_side = v.patches_per_side
        self.pool = v.patches_per_side // config.tokens_per_side
        self.mm_soft_emb_norm = Gemma3RMSNorm(v.hidden_size, v.layer_norm_eps, dtype=dtype)
        self.mm_input_projection_weight = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (v.hidden_size, t.hidden_size), dtype))

    def __call__(self, vision_outputs: jax.Array) -> jax.Array:
        n, _, d = vision_outputs.shape
        s, k = self.patches_per_side, self.pool
        grid = vision_outputs.reshape(n, s // k, k, s // k, k, d)  # patches are row-major
        pooled = grid.astype(jnp.float32).mean(axis=(2, 4)).astype(vision_outputs.dtype).reshape(n, -1, d)
        x, w = self.mm_soft_emb_norm(pooled), self.mm_input_projection_weight[...]
        # bfloat16 products accumulate in float32 (faster on CPU too); float32 is unchanged
        return jnp.einsum("NPV,VD->NPD", x, w, preferred_element_type=jnp.float32,
                          precision=float32_precision(x, w)).astype(jnp.result_type(x, w))


def image_blocks(token_type_ids: jax.Array) -> jax.Array:
    """(B, T) id of the image each token belongs to (1, 2, ... per row; 0 for text): each contiguous
    run of image tokens is one image, whose tokens attend to each other bidirectionally."""
    is_image = token_type_ids == 1
    starts = is_image & ~jnp.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(is_image, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)


def check_image_token_count(config: Gemma3Config, input_ids, inputs: dict) -> None:
    """Raise ValueError unless the prompt holds exactly one image token per image feature."""
    n_images = (inputs["pixel_values"] if "pixel_values" in inputs else inputs["image_features"]).shape[0]
    n_tokens = int((jnp.asarray(input_ids) == config.image_token_index).sum())
    if n_tokens != n_images * config.mm_tokens_per_image:
        raise ValueError(f"image features and image tokens do not match: the prompt has {n_tokens} image tokens, "
                         f"the {n_images} images give {n_images * config.mm_tokens_per_image} "
                         f"({config.mm_tokens_per_image} each)")


def merge_image_features(embeds: jax.Array, input_ids: jax.Array, features: jax.Array, image_token_id: int):
    """Put image features (N, tokens, D) at the image-token positions, batch then position order.
    The counts must agree (see ``check_image_token_count``; not checkable inside jit)."""
    is_image = input_ids == image_token_id
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.cumsum(is_image.reshape(-1)) - 1
    gathered = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(is_image[..., None], gathered, embeds)


@output_class
class Gemma3MultimodalModelOutputWithPast(ModelOutput):
    last_hidden_state: jax.Array | None = None
    past_key_values: kv.KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    image_hidden_states: jax.Array | None = None


@output_class
class Gemma3MultimodalCausalLMOutputWithPast(ModelOutput):
    loss: jax.Array | None = None
    logits: jax.Array | None = None
    past_key_values: kv.KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None
    attentions: tuple[jax.Array, ...] | None = None
    image_hidden_states: jax.Array | None = None


class Gemma3Model(nnx.Module):
    """Vision tower + projector + text decoder, without the LM head."""

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = SiglipVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Gemma3MultiModalProjector(config, dtype=dtype, rngs=rngs)
        self.language_model = Gemma3TextModel(config.text_config, dtype=dtype, rngs=rngs)

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        """(N, 3, H, W) pixels → (N, mm_tokens_per_image, text hidden) soft tokens."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                 past_key_values=None, token_type_ids=None, inputs_embeds=None, image_features=None,
                 output_attentions=False, output_hidden_states=False):
        """``image_features`` (N, tokens, D) may replace ``pixel_values`` (embeddings computed elsewhere,
        e.g. by the vision worker). ``token_type_ids`` (1 at image soft tokens) turns on the
        bidirectional attention within each image, as in transformers; without it all is causal."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        image_id = self.config.image_token_index
        if inputs_embeds is None:
            ids = input_ids
            if image_id >= self.config.text_config.vocab_size:  # out of the table: embed a pad, replaced below
                ids = jnp.where(input_ids == image_id, 0, input_ids)
            inputs_embeds = self.language_model.embed(ids)
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        if image_features is not None:
            if input_ids is None:
                raise ValueError("merging image features needs input_ids to find the image tokens")
            if not isinstance(input_ids, jax.core.Tracer):  # eager call: check the counts here
                check_image_token_count(self.config, input_ids, {"image_features": image_features})
            inputs_embeds = merge_image_features(inputs_embeds, input_ids, image_features, image_id)
        out = self.language_model(
            attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            image_blocks=None if token_type_ids is None else image_blocks(jnp.asarray(token_type_ids)),
        )
        return Gemma3MultimodalModelOutputWithPast(**out.to_dict(), image_hidden_states=image_features)


class Gemma3ForConditionalGeneration(CausalLMMixin, nnx.Module):
    """Gemma3Model with the LM head. ``apply_lm_head`` applies final-logit softcapping when the config
    sets a cap (as our reference API does; transformers skips it here; released checkpoints set none)."""

    config_class = Gemma3Config
    hf_architecture = "Gemma3ForConditionalGeneration"

    @staticmethod
    def checkpoint_key(key: str) -> str | None:
        from gemma3.checkpoint import multimodal_key

        return multimodal_key(key)

    @staticmethod
    def saved_key(name: str) -> str:
        from gemma3.checkpoint import multimodal_saved_key

        return multimodal_saved_key(name)

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.model = Gemma3Model(config, dtype=dtype, rngs=rngs)
        t = config.text_config
        self.lm_head = None if config.tie_word_embeddings else _linear(t.hidden_size, t.vocab_size, dtype, rngs)

    def get_vision_tower(self) -> SiglipVisionModel:
        return self.model.vision_tower

    def get_projector(self) -> Gemma3MultiModalProjector:
        return self.model.multi_modal_projector

    def get_language_model(self) -> Gemma3TextModel:
        return self.model.language_model

    get_decoder = get_language_model

    def get_embedding(self) -> nnx.Embed:
        return self.model.language_model.embed_tokens

    def get_lm_head(self) -> nnx.Linear | None:
        return self.lm_head

    def get_encoder(self) -> SiglipVisionModel:
        return self.model.vision_tower

    def get_image_features(self, pixel_values: jax.Array) -> jax.Array:
        return self.model.get_image_features(pixel_values)

    def __call__(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                 past_key_values=None, token_type_ids=None, inputs_embeds=None, labels=None, image_features=None,
                 output_attentions=False, output_hidden_states=False, logits_to_keep: int = 0):
        out = self.model(input_ids, pixel_values, attention_mask, position_ids, past_key_values, token_type_ids,
                         inputs_embeds, image_features, output_attentions, output_hidden_states)
        logits, loss = self.logits_and_loss(out.last_hidden_state, labels, logits_to_keep)
        return Gemma3MultimodalCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            image_hidden_states=out.image_hidden_states,
        )


class _VisionHalf(nnx.Module):
    def __init__(self, config: Gemma3Config, *, dtype, rngs: nnx.Rngs, of: Gemma3Model | None = None):
        """New weights, or ``of`` a loaded model's own (shared, not copied)."""
        if of is not None:
            self.vision_tower, self.multi_modal_projector = of.vision_tower, of.multi_modal_projector
            return
        self.vision_tower = SiglipVisionModel(config.vision_config, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Gemma3MultiModalProjector(config, dtype=dtype, rngs=rngs)


class Gemma3ImageEncoder(PretrainedMixin, nnx.Module):
    """Only the vision tower and the projector, loaded from a full multimodal checkpoint: what a
    vision worker needs, without the memory of the decoder."""

    config_class = Gemma3Config

    def __init__(self, config: Gemma3Config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None,
                 of: Gemma3Model | None = None):
        """``of``: a loaded ``Gemma3Model`` whose tower and projector this encoder runs (no second copy:
        an LM worker that embeds images itself)."""
        self.config = config
        self.model = _VisionHalf(config, dtype=dtype, rngs=rngs or nnx.Rngs(0), of=of)

    @staticmethod
    def checkpoint_key(key: str) -> str | None:
        from gemma3.checkpoint import multimodal_key

        name = multimodal_key(key)
        return name if name and name.startswith(("model.vision_tower.", "model.multi_modal_projector.")) else None

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """(N, 3, H, W) pixels → (N, mm_tokens_per_image, text hidden): what Gemma3Model merges."""
        return self.model.multi_modal_projector(self.model.vision_tower(pixel_values))
