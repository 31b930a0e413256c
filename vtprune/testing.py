"""Tiny random-weight VLMs with offline tokenizers and processors, for tests and examples.

Nothing here touches a hub: tokenizers are word-level, built from a fixed vocabulary, and every
config is written out explicitly (by each family's ``tiny_parts`` in :mod:`vtprune.models`). The models are real ``transformers`` classes, so hooks installed
by :func:`vtprune.apply` behave exactly as they would on a released checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .models import FAMILIES, family_class


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


def tiny_vlm(family: str, attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 4) -> TinyVLM:
    """Build a tiny random-weight VLM of ``family`` (a registered family, e.g. one of :data:`FAMILIES`) with its
    processor; the family's adapter supplies the config and processor."""
    adapter = family_class(family)
    torch.manual_seed(seed)
    config, proc = adapter.tiny_parts(num_layers)
    model = adapter.model_class(config)(config)
    adapter.tiny_weights(model)
    tok = proc.tokenizer
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


def shortened_lm_inputs(lm_kwargs: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The language model's per-token keyword inputs other than embeddings, mask and positions, shortened by hand to
    the kept sequence indices ``keep`` of a one-row call (for references built from stock modules): DeepStack's
    ``visual_pos_masks`` keeps the kept columns and each of its ``deepstack_visual_embeds`` levels the rows of the
    kept visual tokens (Qwen3-VL). Empty when the call has none."""
    mask, levels = lm_kwargs.get("visual_pos_masks"), lm_kwargs.get("deepstack_visual_embeds")
    if mask is None or levels is None:
        return {}
    rows = (mask.long().cumsum(1) - 1)[:, keep][mask[:, keep]]
    return {"visual_pos_masks": mask[:, keep], "deepstack_visual_embeds": [e[rows] for e in levels]}


__all__ = ["FAMILIES", "TinyVLM", "random_image", "shortened_lm_inputs", "tiny_vlm"]
