"""The testbed VLMs: word-level tokenizers, processors, prompt format and randomly initialised models.

Two families, both stock ``transformers`` classes so that ``vtprune`` hooks see exactly what they see on a
released checkpoint:

* ``llava``: ``LlavaForConditionalGeneration``; CLIP ViT at 168 px with patch 14 (12x12 = 144 visual tokens,
  [CLS] dropped by the "default" feature strategy), read at the penultimate layer as in LLaVA-1.5 (the last
  layer only carries [CLS]), a 2-layer GELU projector and a 6-layer Llama.
* ``qwen2_vl``: ``Qwen2VLForConditionalGeneration``; its own ViT (2-D RoPE, no absolute positions) at 224 px
  with patch 14 (16x16 patches), the 2x2 patch merger (8x8 = 64 visual tokens) and a 6-layer Qwen2 LLM with
  M-RoPE.

Prompt format (one-word answers, no chat roles): ``<image> what colour is the circle ?`` for LLaVA (the
tokenizer prepends ``<bos>``) and ``<|vision_start|><|image_pad|><|vision_end|> what colour ... ?`` for
Qwen2-VL; the next token is the answer, followed by ``<eos>``. Training sequences chain several such turns
on one image, ``... ? red <eos> where is ... ? top-left <eos> ...``, and end with a caption turn
``list the objects ? small red circle top-left ... <eos>``. The processors carry a chat template that renders
the same strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from .questions import ANSWERS, VOCAB

FAMILIES: tuple[str, ...] = ("llava", "qwen2_vl")
IMAGE_SIZE: dict[str, int] = {"llava": 168, "qwen2_vl": 224}
PATCH = 14
MERGE = 2  # Qwen2-VL's spatial merge: 2x2 patches per visual token
TEMPORAL_PATCH = 2  # Qwen2-VL repeats a still image over its 2-frame temporal patch
QWEN_ROPE_THETA = 30.0  # not 10000: see _qwen_config
CAPTION_PROMPT = "list the objects ?"
EXTRA_WORDS: tuple[str, ...] = ("list",)  # words of CAPTION_PROMPT missing from VOCAB
ANSWER_WORDS: tuple[str, ...] = tuple(sorted({a for answers in ANSWERS.values() for a in answers}))

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
LLAVA_IMAGE = "<image>"
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
SPECIALS: dict[str, tuple[str, ...]] = {
    "llava": (PAD, UNK, BOS, EOS, LLAVA_IMAGE),
    "qwen2_vl": (PAD, UNK, EOS, QWEN_START, QWEN_END, QWEN_IMAGE, QWEN_VIDEO),
}
IMAGE_PREFIX: dict[str, str] = {"llava": LLAVA_IMAGE, "qwen2_vl": QWEN_START + QWEN_IMAGE + QWEN_END}
VIDEO_PREFIX = QWEN_START + QWEN_VIDEO + QWEN_END  # the video testbed (Qwen2-VL only)


@dataclass(frozen=True)
class Sizes:
    """Widths and depths of one model; ``full`` is what ships, ``tiny`` is for tests. ``vision_layers`` is the
    depth of the features the projector / merger reads."""

    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    heads: int = 4


SIZES: dict[str, Sizes] = {
    "full": Sizes(vision_hidden=128, vision_layers=4, text_hidden=128, text_layers=6),
    "tiny": Sizes(vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=2, heads=2),
}


# ------------------------------------------------------------------------------------- text side


def prompt(family: str, question: str) -> str:
    """The evaluation prompt: the image placeholder(s), then the question (which ends with ``?``)."""
    return f"{IMAGE_PREFIX[family]} {question}"


def video_prompt(question: str) -> str:
    """The video testbed's evaluation prompt: the video placeholder, then the question."""
    return f"{VIDEO_PREFIX} {question}"


def chat_template(family: str) -> str:
    """A Jinja chat template that renders a user turn [image, text] as ``prompt(family, text)`` (Qwen2-VL: [video,
    text] as ``video_prompt(text)``); an assistant turn [text] adds ``text <eos>``. Roles are not rendered: the
    testbed has no chat format."""
    image = f"{{% if c['type'] == 'image' %}}{IMAGE_PREFIX[family]} "
    video = f"{{% elif c['type'] == 'video' %}}{VIDEO_PREFIX} " if family == "qwen2_vl" else ""
    return ("{% for m in messages %}{% for c in m['content'] %}"
            f"{image}{video}{{% else %}}{{{{ c['text'] }}}} {{% endif %}}"
            f"{{% endfor %}}{{% if m['role'] == 'assistant' %}}{EOS} {{% endif %}}{{% endfor %}}")


def build_tokenizer(family: str, extra_words: tuple[str, ...] = ()) -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer over the specials, ``VOCAB`` and ``EXTRA_WORDS``; every word is one token.
    ``extra_words`` (the video testbed's) get the ids after those, so the image ids stay as they are.

    Specials are added to the backend as special tokens so that they match without surrounding spaces
    (the processors expand one image placeholder into a run of them). LLaVA's tokenizer prepends ``<bos>``
    (an attention sink; Qwen2-VL has none). Padding is on the left, for batched next-token evaluation."""
    specials = list(SPECIALS[family])
    words = sorted(set(VOCAB) | set(EXTRA_WORDS))
    vocab = {w: i for i, w in enumerate(specials + words + [w for w in extra_words if w not in words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    if family == "llava":
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, unk_token=UNK, eos_token=EOS,
                                     bos_token=BOS if family == "llava" else None, padding_side="left")
    if family == "llava":
        tok.image_token = LLAVA_IMAGE
    else:
        tok.image_token, tok.video_token = QWEN_IMAGE, QWEN_VIDEO
        tok.vision_start_token, tok.vision_end_token = QWEN_START, QWEN_END
    return tok


def answer_token_ids(tokenizer: tf.PreTrainedTokenizerFast) -> list[int]:
    """Token ids of ``ANSWER_WORDS``, in that order (evaluation takes the argmax over these)."""
    return tokenizer.convert_tokens_to_ids(list(ANSWER_WORDS))


# ----------------------------------------------------------------------------------- processors


def build_processor(family: str, extra_words: tuple[str, ...] = ()) -> tf.ProcessorMixin:
    """The family's processor: LLaVA gets a CLIP image processor at 168 px (144 image tokens after dropping
    [CLS]); Qwen2-VL gets ``Qwen2VLImageProcessor`` with min = max pixels = 224^2, so every image becomes a
    16x16 patch grid and 64 merged tokens (and every video frame too). ``extra_words`` as in ``build_tokenizer``."""
    tok = build_tokenizer(family, extra_words)
    side = IMAGE_SIZE[family]
    if family == "llava":
        improc = tf.CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return tf.LlavaProcessor(improc, tok, patch_size=PATCH, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=chat_template(family))
    pixels = {"shortest_edge": side * side, "longest_edge": side * side}
    geometry = dict(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH)
    improc = tf.Qwen2VLImageProcessor(size=pixels, **geometry)
    # frames are fixed at 224² (min = max pixels), so transformers' per-video pixel cap changes nothing: pinned off so
    # that a transformers default flip cannot change the inputs, and its warning stays quiet
    video = tf.Qwen2VLVideoProcessor(size=pixels, cap_pixels_per_frame=False, **geometry)
    return tf.Qwen2VLProcessor(improc, tok, video, chat_template=chat_template(family))


def num_image_tokens(family: str) -> int:
    """Visual tokens per image that reach the LLM: 144 for LLaVA, 64 for Qwen2-VL."""
    grid = IMAGE_SIZE[family] // PATCH
    return grid * grid if family == "llava" else (grid // MERGE) ** 2


# ---------------------------------------------------------------------------------------- models


def build_model(family: str, seed: int, size: str = "full") -> tuple[Any, tf.ProcessorMixin]:
    """A randomly initialised model of ``family`` (weights drawn after ``torch.manual_seed(seed)``) and its
    processor. ``generate`` gets the tokenizer's pad, eos and (LLaVA only) bos ids, so it stops after the
    answer's ``<eos>``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    processor = build_processor(family)
    tok = processor.tokenizer
    torch.manual_seed(seed)
    config = _llava_config(tok, SIZES[size]) if family == "llava" else _qwen_config(tok, SIZES[size])
    model = (tf.LlavaForConditionalGeneration if family == "llava" else tf.Qwen2VLForConditionalGeneration)(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model, processor


def load_checkpoint(path: str | Path) -> tuple[Any, tf.ProcessorMixin]:
    """A saved testbed model in float32 (checkpoints are stored in float16) with its processor, in eval mode;
    local files only, so a mistyped path never becomes a hub download."""
    model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    return model.eval(), tf.AutoProcessor.from_pretrained(path, local_files_only=True)


def _text_config(tok: tf.PreTrainedTokenizerFast, s: Sizes) -> dict:
    """Shared LLM settings: SwiGLU MLP of 3x width, full multi-head attention, untied head."""
    return dict(vocab_size=len(tok), hidden_size=s.text_hidden, intermediate_size=3 * s.text_hidden,
                num_hidden_layers=s.text_layers, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _llava_config(tok: tf.PreTrainedTokenizerFast, s: Sizes) -> tf.LlavaConfig:
    """CLIP tower + 2-layer MLP + Llama. As in LLaVA-1.5 the projector reads the penultimate layer
    (``vision_feature_layer=-2``; vtprune's [CLS]-attention scorers read that layer too), so the tower gets
    one layer more than ``s.vision_layers``: the last one only feeds [CLS] (``pooler_output``), which stage 1
    trains on an image-level objective."""
    vision = dict(model_type="clip_vision_model", hidden_size=s.vision_hidden, intermediate_size=4 * s.vision_hidden,
                  num_hidden_layers=s.vision_layers + 1, num_attention_heads=s.heads, image_size=IMAGE_SIZE["llava"],
                  patch_size=PATCH, hidden_act="quick_gelu")
    return tf.LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **_text_config(tok, s)),
                          image_token_id=tok.convert_tokens_to_ids(LLAVA_IMAGE),
                          image_seq_length=num_image_tokens("llava"),
                          vision_feature_layer=-2, vision_feature_select_strategy="default",
                          projector_hidden_act="gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id)


def _qwen_config(tok: tf.PreTrainedTokenizerFast, s: Sizes) -> tf.Qwen2VLConfig:
    """Qwen2-VL ViT + patch merger (the projector) + Qwen2 LLM with M-RoPE; the sections split the rotary
    half-dimensions 1/4 temporal, 3/8 height, 3/8 width as in Qwen2-VL.

    M-RoPE gives each section a contiguous block of frequencies, highest first, so width gets the lowest ones.
    At head dim 32 and the usual theta 10000 those rotate by at most 0.003 rad per column (0.02 across the
    8-token grid): left and right are invisible to attention and position questions stay near chance (60 %
    in our run). ``QWEN_ROPE_THETA`` = 30 makes width rotate 0.12 rad per column with the lowest period still
    ~150 positions, longer than any testbed sequence."""
    half = s.text_hidden // s.heads // 2
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    text = _text_config(tok, s) | dict(rope_parameters={"rope_type": "default", "rope_theta": QWEN_ROPE_THETA,
                                                        "mrope_section": sections})
    vision = dict(depth=s.vision_layers, embed_dim=s.vision_hidden, hidden_size=s.text_hidden, num_heads=s.heads,
                  mlp_ratio=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", QWEN_IMAGE), ("video_token_id", QWEN_VIDEO),
        ("vision_start_token_id", QWEN_START), ("vision_end_token_id", QWEN_END))}
    return tf.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
