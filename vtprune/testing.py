"""Tiny random-weight VLMs with offline tokenizers and processors, for tests and examples.

Nothing here touches a hub: tokenizers are word-level, built from a fixed vocabulary, and every
config is written out explicitly. The models are real ``transformers`` classes, so hooks installed
by :func:`vtprune.apply` behave exactly as they would on a released checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl")

_WORDS = (
    "what is the colour of shape left right top bottom a an in on how many are there red green blue "
    "yellow circle square triangle small large yes no one two three four five describe image picture "
    "user assistant system you helpful answer question word with and object near far big tiny"
).split()

_CHAT_TEMPLATES = {
    "llava": (
        "{% for m in messages %}{{ m['role'] | upper }}: "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    "qwen": (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} "
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|> <|image_pad|> <|vision_end|> "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}<|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    ),
}


def _tokenizer(specials: list[str], chat_template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + ["USER:", "ASSISTANT:", "USER", "ASSISTANT"] + _WORDS)}
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)  # matched anywhere, e.g. in "<image><image>..."
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token=specials[0])
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


@dataclass
class TinyVLM:
    """A tiny model, its processor and the family name."""

    model: Any
    processor: Any
    family: str

    def inputs(self, prompts: list[str], images: list[list[Image.Image]] | list[Image.Image]) -> dict:
        """Processor outputs for a (left-padded) batch; each prompt may hold several images."""
        return dict(self.processor(text=prompts, images=images, return_tensors="pt", padding=True))

    def prompt(self, question: str, n_images: int = 1) -> str:
        """A chat-formatted prompt with ``n_images`` images before the question."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def random_image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    """A deterministic noise image (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _text_config(vocab: int, **extra) -> dict:
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=None, eos_token_id=None, pad_token_id=0)
    cfg.update(extra)
    return cfg


def tiny_vlm(family: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 4) -> TinyVLM:
    """Build a tiny random-weight VLM of ``family`` (one of :data:`FAMILIES`) with its processor."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        tok = _tokenizer(["<pad>", "<s>", "</s>", "<image>"], _CHAT_TEMPLATES["llava"])
        tok.image_token = "<image>"
        vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, image_size=56, patch_size=14, projection_dim=64)
        text = dict(model_type="llama", **_text_config(len(tok), num_hidden_layers=num_layers))
        common = dict(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      pad_token_id=0)
        size = {"shortest_edge": 56}
        crop = {"height": 56, "width": 56}
        if family == "llava":
            cfg = tf.LlavaConfig(**common, image_seq_length=16)
            model = tf.LlavaForConditionalGeneration(cfg)
            improc = tf.CLIPImageProcessor(size=size, crop_size=crop)
            proc = tf.LlavaProcessor(improc, tok, patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=_CHAT_TEMPLATES["llava"])
        else:
            pins = [[56, 112], [112, 56], [112, 112]]
            cfg = tf.LlavaNextConfig(**common, image_grid_pinpoints=pins, image_seq_length=16)
            model = tf.LlavaNextForConditionalGeneration(cfg)
            improc = tf.LlavaNextImageProcessor(size=size, crop_size=crop, image_grid_pinpoints=pins)
            proc = tf.LlavaNextProcessor(improc, tok, patch_size=14, vision_feature_select_strategy="default",
                                         num_additional_image_tokens=1, chat_template=_CHAT_TEMPLATES["llava"])
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
        tok = _tokenizer(specials, _CHAT_TEMPLATES["qwen"])
        tok.image_token, tok.video_token = "<|image_pad|>", "<|video_pad|>"
        tok.vision_start_token, tok.vision_end_token = "<|vision_start|>", "<|vision_end|>"
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        head_dim = 64 // 4
        text = _text_config(len(tok), num_hidden_layers=num_layers,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [2, 3, 3]})
        assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
        improc = tf.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
        video = tf.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2)
        if family == "qwen2_vl":
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                          temporal_patch_size=2, mlp_ratio=2)
            cfg = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2VLForConditionalGeneration(cfg)
            proc = tf.Qwen2VLProcessor(improc, tok, video, chat_template=_CHAT_TEMPLATES["qwen"])
        else:
            vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=4,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
            cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
            model = tf.Qwen2_5_VLForConditionalGeneration(cfg)
            proc = tf.Qwen2_5_VLProcessor(improc, tok, video, chat_template=_CHAT_TEMPLATES["qwen"])
    model.eval()
    model.set_attn_implementation(attn_implementation)
    # a random model must not generate placeholders: uncached generation would re-read them as images
    specials = sorted(i for t, i in tok.get_vocab().items() if t.startswith("<") and i != tok.pad_token_id)
    model.generation_config.suppress_tokens = specials
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None
    for cfg_ in (model.config, model.config.text_config):
        cfg_.bos_token_id = cfg_.eos_token_id = None
        cfg_.pad_token_id = tok.pad_token_id
    return TinyVLM(model=model, processor=proc, family=family)
