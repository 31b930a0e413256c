"""Shared fixtures: tiny offline VLMs of every family, and prompts with ragged image sizes."""

from __future__ import annotations

import functools

import pytest
import torch

from vtprune.models import adapter_for
from vtprune.testing import FAMILIES, TinyVLM, random_image, tiny_vlm

torch.set_num_threads(1)

ATTN = ("sdpa", "eager")
SITES = ({"site": "pre_llm"}, {"site": "layer", "layer": 2})
GEN = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)


@functools.lru_cache(maxsize=None)
def model(family: str, attn: str = "sdpa") -> TinyVLM:
    """One tiny model per (family, attention) for the whole session; tests must leave it unhooked."""
    return tiny_vlm(family, attn_implementation=attn)


def image_for(family: str, i: int):
    """Sample i's image: LLaVA-1.5 has one size; the others get different sizes, hence ragged token counts."""
    sizes = [(112, 112), (112, 56), (56, 112)]
    return random_image(i, (56, 56) if family == "llava" else sizes[i % len(sizes)])


QUESTIONS = ["what is the colour of the small circle", "how many", "is there a red square on the left"]


def batch_inputs(tv: TinyVLM, samples: list[int], n_images: int = 1) -> dict:
    """A left-padded batch of the given sample ids (different prompt lengths and image sizes)."""
    prompts = [tv.prompt(QUESTIONS[i % len(QUESTIONS)], n_images) for i in samples]
    images = [[image_for(tv.family, i + j) for j in range(n_images)] for i in samples]
    return tv.inputs(prompts, images)


def layer_attentions(tv: TinyVLM, inputs: dict, layer: int) -> torch.Tensor:
    """[b, H, L, L] attention weights of decoder layer ``layer`` (``output_attentions`` lists only the layers that
    attend: recurrent layers have no attention map)."""
    recurrent = adapter_for(tv.model).recurrent_layers
    attentions = tv.model(**inputs, output_attentions=True).attentions
    return attentions[[i for i in range(layer + 1) if i not in recurrent].index(layer)]


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
