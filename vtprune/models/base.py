"""The model-family base: a :class:`ModelAdapter` subclass is everything vtprune knows about one VLM family.

On an instance (a loaded model): the modules to hook (backbone, language model, decoder layers), the image
placeholder tokens, each image's token layout, position ids, and where signals are captured. On the class
(a config is enough): the FLOPs shapes of the vision side, the tiny random-weight builder, synthetic
benchmark images, the shipped bench configs and the lmms-eval wrapper the family is evaluated with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, ProjectorInput, VisionQK, rotate
from ..errors import VTPruneError
from ..view import ImageLayout

#: words of the tiny models' word-level vocabulary (after each family's special tokens)
TINY_WORDS = (
    "what is the colour of shape left right top bottom a an in on how many are there red green blue "
    "yellow circle square triangle small large yes no one two three four five describe image picture "
    "user assistant system you helpful answer question word with and object near far big tiny"
).split()


@dataclass(frozen=True)
class VisionWork:
    """What the vision encoder processes in one forward: LLaVA/LLaVA-NeXT square views, or Qwen ``(t, h, w)``
    patch grids (images and videos). The family's :meth:`ModelAdapter.vision_work` reads it off the inputs."""

    views: int = 0
    grids: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class LmmsWrapper:
    """The lmms-eval wrapper a family is evaluated with: vtprune's model id, the dotted paths of lmms-eval's own
    simple and chat classes that :mod:`vtprune.lmms_models` subclasses (``None`` where lmms-eval has none), and
    which of ``dtype`` / ``attn_implementation`` the wrapper accepts as model args."""

    model_id: str
    simple: str | None
    chat: str | None
    takes: tuple[str, ...] = ()

    def bases(self) -> tuple[tuple[bool, str], ...]:
        """(is simple, lmms-eval class path) of each lmms-eval class the family's wrapper has."""
        return tuple((simple, path) for simple, path in ((True, self.simple), (False, self.chat)) if path is not None)

    def pruned_class_name(self, simple: bool) -> str:
        """Name of the pruned subclass in :mod:`vtprune.lmms_models`, e.g. ``PrunedLlavaHfSimple``."""
        stem = "".join(p.capitalize() for p in self.model_id.removeprefix("vtprune_").split("_"))
        return f"Pruned{stem}{'Simple' if simple else ''}"


@dataclass(frozen=True)
class SyntheticImage:
    """One random benchmark image: its ``pixel_values``, the placeholder ids of its span in the prompt, and the
    other model inputs it comes with (``image_sizes``, ``image_grid_thw``)."""

    pixel_values: torch.Tensor
    placeholders: torch.Tensor
    inputs: dict[str, torch.Tensor]


def tiny_tokenizer(specials: list[str], chat_template: str) -> Any:
    """A left-padding word-level fast tokenizer over ``specials`` + :data:`TINY_WORDS` (offline, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + ["USER:", "ASSISTANT:", "USER", "ASSISTANT"] + TINY_WORDS)}
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)  # matched anywhere, e.g. in "<image><image>..."
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token=specials[0])
    tok.chat_template = chat_template
    tok.padding_side = "left"
    return tok


def tiny_text_config(vocab: int, **extra: Any) -> dict[str, Any]:
    """The tiny models' 64-wide decoder (4 heads, 2 KV heads), as config keyword arguments."""
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               bos_token_id=None, eos_token_id=None, pad_token_id=0)
    cfg.update(extra)
    return cfg


@dataclass
class ImageSpans:
    """Where the images sit in a prefill batch: for each image (batch order) its row and the sequence
    positions of its placeholder tokens. Layouts are filled in once the features are known."""

    rows: list[int]
    positions: list[torch.Tensor]
    layouts: list[ImageLayout] | None = None
    #: per item, whether it is a video (all of a video's placeholder tokens are one item); empty: all images
    videos: list[bool] = field(default_factory=list)
    extras: list[dict[str, Any]] | None = None
    #: [b, L] attention-block id per token of the call (-1: causal), for families whose image tokens attend
    #: bidirectionally within a block (:meth:`ModelAdapter.lm_masks`); ``None`` elsewhere
    blocks: torch.Tensor | None = None
    #: per row, its real non-image tokens, when the site read them before the decoder layers (so that
    #: :meth:`text_index` reads nothing); per item, the text tokens after it and those between its first and last
    #: token (a video's timestamps; ``None``: not read)
    text_counts: list[int] | None = None
    text_after: list[int] | None = None
    text_inside: list[int] | None = None
    #: what :meth:`image_mask` and :meth:`text_index` built for this call (a copy made by ``replace`` starts empty)
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.rows)

    def items_text_after(self) -> list[int | None]:
        """Per item, the text tokens after it when the site read them, else ``None`` for each."""
        return self.text_after or [None] * len(self)

    def image_mask(self, shape: tuple[int, int]) -> torch.Tensor:
        """[b, L] bool mask of every image token of the batch (built once per shape: treat it as read-only)."""
        key = ("image", tuple(shape))
        if key not in self._memo:
            device = self.positions[0].device if self.positions else None
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            for row, pos in zip(self.rows, self.positions):
                mask[row].index_fill_(0, pos, True)
            self._memo[key] = mask
        return self._memo[key]

    def text_index(self, real: torch.Tensor, row: int) -> torch.Tensor:
        """Sequence indices of ``row``'s real non-image tokens (``real`` [b, L]); found once per call and row, as
        the selection and the decoder q/k capture both read them (a host read on a GPU unless ``text_counts``)."""
        key = ("text", id(real), row)
        hit = self._memo.get(key)
        if hit is None or hit[0] is not real:
            text = real[row] & ~self.image_mask(real.shape)[row]
            index = (text.nonzero().flatten() if self.text_counts is None
                     else torch.nonzero_static(text, size=self.text_counts[row], fill_value=0).flatten())
            hit = self._memo[key] = (real, index)
        return hit[1]


class ModelAdapter:
    """Base adapter. Subclasses set :attr:`family`, :attr:`model_classes` and implement
    :meth:`image_counts` and :meth:`layout`; the class-level hooks below are optional (a family without
    them can be pruned but not counted, benchmarked or built tiny)."""

    #: the family's name: the ``model_type`` of its transformers config
    family: str = ""
    #: transformers class names of the family (the first one is built by :meth:`model_class`)
    model_classes: tuple[str, ...] = ()
    #: 1 for plain [b, L] position ids, 3 for M-RoPE [3, b, L] (plus an optional text row 0: [4, b, L]).
    position_axes: int = 1
    #: shipped real-size configs of the family (``configs/models/<name>.json``)
    bench_configs: tuple[str, ...] = ()
    #: end-of-sequence token the harness gives a saved tiny model's tokenizer
    tiny_eos: str = ""
    #: the lmms-eval wrapper of the family
    lmms: LmmsWrapper | None = None
    #: whether the vision encoder has a [CLS] token (without one, [CLS]-reading methods use the documented
    #: received-attention fallback)
    vision_cls: bool = True
    #: attention implementations the exactness suite runs the family with
    tested_attention: tuple[str, ...] = ("sdpa", "eager")
    #: per site name: what the family refuses or restricts there, and why (shown in the README support matrix)
    site_limits: Mapping[str, str] = {}
    #: whether the family's video inputs are pruned (one item per video, :meth:`video_counts`,
    #: :meth:`video_layout`); elsewhere video placeholders are left alone, as text
    prunes_video: bool = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.backbone: nn.Module = model.model
        self.language_model: nn.Module = self.backbone.language_model
        self.layers: nn.ModuleList = self.language_model.layers
        self.image_token_id: int = int(model.config.image_token_id)
        vid = getattr(model.config, "video_token_id", None)
        #: the video placeholder token, where the family prunes videos (:meth:`video_counts`); else ``None``
        self.video_token_id: int | None = None if vid is None or not self.prunes_video else int(vid)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation or "eager"

    @property
    def recurrent_layers(self) -> frozenset[int]:
        """Decoder layers whose token mixer keeps a fixed-size recurrent state instead of per-token keys (linear
        attention): they take a 2-D padding mask over the call's own tokens, or none, never a 4-D mask, and
        hold nothing per token in the cache. None by default."""
        return frozenset()

    def check_site(self, config: Any, needs: frozenset[str]) -> None:
        """Refuse (VTPruneError) a site configuration ``config`` this family cannot run exactly, for a pruner that
        reads the signals ``needs``; called at ``apply`` after the site's own check. Accepts all by default."""

    def gather_lm_inputs(self, kwargs: dict[str, Any], plan: Any) -> None:
        """Make the language model's per-token keyword inputs other than embeddings, mask and positions (e.g.
        Qwen3-VL's DeepStack ``visual_pos_masks``/``deepstack_visual_embeds``) follow ``plan`` (a
        :class:`vtprune.plan.KeepPlan` over this call's tokens), in place; called by the pre-LLM site after it
        pruned the embeddings. None by default."""

    def follow_layer_plan(self, layer: int, rows: Any) -> list[Any]:
        """Install what layers >= K (``layer``) need beyond their hooked kwargs to run on pruned tokens (e.g. a wrapper of
        a language-model method that adds per-token features between layers); ``rows()`` gives the plan of the
        call's tokens once layer K pruned them (``None`` before, or when nothing was pruned). Returns handles
        with ``remove()`` that the engine calls on removal. Nothing by default."""
        return []

    def observe_generate(self, kwargs: dict[str, Any]) -> None:
        """See the keyword inputs of a ``model.generate`` call before it runs. ``generate`` encodes the images itself
        before its first forward, so inputs only the encoder reads (e.g. image sizes) reach the adapter only here.
        No-op by default."""

    # ---- per-layer-type masks -----------------------------------------------------------------------
    def lm_masks(self, embeds: torch.Tensor, padding: torch.Tensor | None, cache: Any, from_layer: int,
                 blocks: torch.Tensor | None = None) -> dict[str, Any] | None:
        """For families whose backbone hands the language model a dict of per-layer-type masks that cannot be
        gathered exactly (windows counting cache slots, masks sized on another layer's cache): those masks
        rebuilt, as the model builds them, for the layers ``>= from_layer`` of a pruned call of ``embeds``
        [b, q, D], given its 2-D ``padding`` mask over the keys of those layers' cache (``None``: no padding),
        the ``cache`` (``None`` for a prefill: sized on ``padding``/``q`` alone) and ``blocks`` [b, q] (see
        :attr:`ImageSpans.blocks`). ``None`` (default): the sites gather the model's own masks."""
        return None

    def llm_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer ``layer`` (a query sees keys fewer than this many tokens before
        it), ``None`` for full attention (default)."""
        return None

    def mask_key(self, layer: int) -> str:
        """The entry of a per-layer-type mask dict that decoder layer ``layer`` reads."""
        return "full_attention"

    # ---- locating images ---------------------------------------------------------------------------
    def image_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                   token_id: int | None = None) -> torch.Tensor:
        """[b, L] bool mask of image placeholder tokens (of ``token_id``'s, e.g. the video token), from ids or
        (failing those) from embeddings."""
        token_id = self.image_token_id if token_id is None else token_id
        if input_ids is not None:
            return input_ids == token_id
        if inputs_embeds is None:
            raise VTPruneError("the model was called with neither input_ids nor inputs_embeds")
        emb = self.backbone.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == emb.to(inputs_embeds.dtype)).all(-1)

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """Visual tokens per image (batch order) from the backbone's keyword inputs; ``None`` if unknown.
        ``generate`` encodes images up front and passes ``mm_encoder_outputs``: their per-image features
        are the authoritative count."""
        return _encoded_counts(inputs, "image")

    def video_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        """Visual tokens per video (batch order) where the family prunes videos; ``None`` if unknown."""
        return _encoded_counts(inputs, "video")

    def layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        """The spatial layout of one image from its features [n, D] and position ids [A, n]."""
        return ImageLayout.flat(features.shape[0])

    def video_layout(self, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        """The layout (frames and the grid of each) of one video from its features [n, D] and position ids [A, n]."""
        raise VTPruneError(f"family {self.family!r} has no video layout")

    def item_layout(self, spans: ImageSpans, i: int, features: torch.Tensor, positions: torch.Tensor) -> ImageLayout:
        """The layout of item ``i`` of ``spans`` (an image or a video)."""
        video = bool(spans.videos) and spans.videos[i]
        return self.video_layout(features, positions) if video else self.layout(features, positions)

    def locate_images(self, inputs: dict[str, Any]) -> ImageSpans | None:
        """Image (and, where the family prunes them, video) spans for a prefill call of the backbone, in sequence
        order within each row; ``None`` when there are no such tokens."""
        ids, embeds = inputs.get("input_ids"), inputs.get("inputs_embeds")
        mask = self.image_mask(ids, embeds)
        vmask = None if self.video_token_id is None else self.image_mask(ids, embeds, self.video_token_id)
        # the one host read: placeholders per row, images then videos (positions are then found without a read)
        per_row = (mask.sum(1) if vmask is None else torch.cat([mask.sum(1), vmask.sum(1)])).tolist()
        b = mask.shape[0]
        found = {False: per_row[:b], True: per_row[b:] or [0] * b}
        has_video = sum(found[True]) > 0
        if sum(found[False]) == 0 and not has_video:
            return None
        counts = self.image_counts(inputs)
        if counts is None or sum(counts) != sum(found[False]):
            counts = _run_lengths(mask)  # one image per contiguous run of placeholders
        vcounts: list[int] = []
        if has_video:
            vcounts = self.video_counts(inputs) or []
            if sum(vcounts) != sum(found[True]):
                raise VTPruneError(f"the prompt holds {sum(found[True])} video placeholder tokens but the videos' "
                                   f"inputs account for {sum(vcounts)}")
        queues = {False: (mask, counts, "image"), True: (vmask, vcounts, "video")}
        spans, taken = ImageSpans([], []), {False: 0, True: 0}
        for row in range(b):
            pos = {video: (torch.nonzero_static(m[row], size=found[video][row]).flatten() if found[video][row]
                           else mask.new_zeros(0, dtype=torch.long))
                   for video, (m, _, _) in queues.items()}
            start = {False: 0, True: 0}
            while any(start[v] < pos[v].numel() for v in pos):
                video = start[True] < pos[True].numel() and (
                    start[False] >= pos[False].numel() or bool(pos[True][start[True]] < pos[False][start[False]]))
                _, sizes, kind = queues[video]
                item = taken[video]
                if item >= len(sizes):
                    raise VTPruneError(f"more {kind} placeholder tokens than the {kind}s' features account for")
                n, left = sizes[item], pos[video].numel() - start[video]
                if n > left:
                    raise VTPruneError(f"{kind} {item} has {n} visual tokens but row {row} has only {left} "
                                       "placeholders left")
                spans.rows.append(row)
                spans.positions.append(pos[video][start[video]:start[video] + n])
                spans.videos.append(video)
                start[video], taken[video] = start[video] + n, item + 1
        if not has_video:
            spans.videos = []
        return spans

    # ---- attention inputs (see vtprune.capture) --------------------------------------------------------
    def llm_attention(self, layer: int) -> nn.Module:
        """The self-attention module of decoder layer ``layer``."""
        return self.layers[layer].self_attn

    def llm_qk(self, layer: int, capture: InputCapture) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Post-RoPE q [b, H, L, hd] and k [b, H_kv, L, hd] of decoder layer ``layer``, recomputed from
        its captured inputs (Llama/Qwen2 attention: q_proj/k_proj, rotate-half RoPE; with per-head
        ``q_norm``/``k_norm`` before RoPE where the attention has them, as Gemma 3's)."""
        attn = self.llm_attention(layer)
        hidden = capture.tensor("hidden_states")
        cos, sin = capture.tensor("position_embeddings", 1)
        b, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(b, n, -1, attn.head_dim)
        k = attn.k_proj(hidden).view(b, n, -1, attn.head_dim)
        if hasattr(attn, "q_norm") and hasattr(attn, "k_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return rotate(q, cos, sin), rotate(k, cos, sin), float(attn.scaling)

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder's root module (its pre-hook marks a new encoding pass)."""
        raise NotImplementedError

    def vision_attention(self, layer: int) -> nn.Module:
        """The attention module of vision-encoder layer ``layer`` (negative indices allowed)."""
        raise NotImplementedError

    @property
    def num_vision_layers(self) -> int:
        raise NotImplementedError

    def vision_full_attention_layers(self) -> list[int]:
        """Vision layers whose attention spans the whole image (all of them, except in Qwen2.5-VL)."""
        return list(range(self.num_vision_layers))

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        """Per image (batch order), per encoder view: q/k of vision layer ``layer`` and where each patch goes."""
        raise NotImplementedError

    @property
    def projector(self) -> nn.Module:
        """The multimodal projector (its pre-hook captures the encoder features it maps)."""
        raise NotImplementedError

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        """Per image (batch order): the projector inputs of each visual token and the projector."""
        raise NotImplementedError

    # ---- family-level (a config suffices) --------------------------------------------------------------
    @classmethod
    def model_class(cls, config: Any = None) -> type[nn.Module]:
        """The transformers class that :meth:`tiny_parts` configs and bench configs are built with: the one of
        :attr:`model_classes` whose config ``model_type`` is ``config``'s (e.g. an MoE variant), else the first."""
        import transformers

        classes = [getattr(transformers, name) for name in cls.model_classes]
        kind = getattr(config, "model_type", None)
        return next((c for c in classes if kind is not None and c.config_class.model_type == kind), classes[0])

    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        """What the vision encoder processes for the model's keyword ``inputs`` (processor outputs)."""
        raise VTPruneError(f"no vision FLOPs formula for model_type={cls.family!r}")

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """Exact FLOPs ``{"vision": ..., "projector": ...}`` of the vision encoder and projector for ``work``."""
        raise VTPruneError(f"no vision FLOPs formula for model_type={cls.family!r}")

    @classmethod
    def llm_layer_flops(cls, config: Any, layer: int, queries: int, keys: int, causal: bool
                        ) -> tuple[int, int] | None:
        """``(llm_linear, llm_attention)`` FLOPs of decoder layer ``layer`` for ``queries`` new tokens of one sequence
        whose cache holds ``keys`` after them (``keys == queries``: a prefill; ``causal``: count only the causal
        query-key pairs), as ``FlopCounterMode`` counts them. ``None`` (default): the LLaMA/Qwen2 decoder formula
        of :mod:`vtprune.flops`."""
        return None

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        """(config, processor) of the family's tiny random-weight model (see :func:`vtprune.testing.tiny_vlm`)."""
        raise VTPruneError(f"family {cls.family!r} has no tiny model")

    @classmethod
    def tiny_weights(cls, model: nn.Module) -> None:
        """Adjust a freshly built tiny random-weight model in place (default: nothing), e.g. draw parameters that
        the family's own init leaves at zero, so that signals read from them are not degenerate."""

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """One random image for the prefill benchmark; ``size`` (H, W) where the family's token count depends
        on it (``None``: the family's default)."""
        raise VTPruneError(f"no synthetic benchmark inputs for model_type={cls.family!r}")

    @classmethod
    def synthetic_video(cls, config: Any, frames: int, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """One random video of ``frames`` frames of ``size`` (H, W; ``None``: the family's default) for the prefill
        benchmark: its ``pixel_values_videos``, placeholder ids and other inputs (``video_grid_thw``, ...)."""
        raise VTPruneError(f"no synthetic benchmark video for model_type={cls.family!r}")

    @classmethod
    def prompt_inputs(cls, config: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs derived from a synthetic prompt's ids besides the attention mask (none by default)."""
        return {}

    # ---- positions -----------------------------------------------------------------------------------
    def default_positions(self, batch: int, length: int, past: int, device: torch.device) -> torch.Tensor:
        """The position ids the language model uses when given none: [A, b, L]."""
        pos = torch.arange(past, past + length, device=device)
        return pos.view(1, 1, -1).expand(self.position_axes, batch, -1)

    def to_model_positions(self, pos: torch.Tensor) -> torch.Tensor:
        """[A, b, L] -> the shape the language model expects."""
        return pos[0] if self.position_axes == 1 else pos

    @staticmethod
    def as_axes(pos: torch.Tensor) -> torch.Tensor:
        """Model position ids ([b, L] or [A, b, L]) -> [A, b, L]."""
        return pos[None] if pos.dim() == 2 else pos


def _run_lengths(mask: torch.Tensor) -> list[int]:
    """Lengths of contiguous True runs, row by row."""
    out = []
    for row in mask:
        pos = row.nonzero().flatten()
        if pos.numel() == 0:
            continue
        breaks = ((pos[1:] - pos[:-1]) != 1).nonzero().flatten() + 1
        edges = [0] + breaks.tolist() + [pos.numel()]
        out.extend(b - a for a, b in zip(edges[:-1], edges[1:]))
    return out


def _encoded_counts(inputs: dict[str, Any], modality: str) -> list[int] | None:
    """Per-item token counts of ``generate``'s up-front encoding (``mm_encoder_outputs[modality]``), if given."""
    encoded = (inputs.get("mm_encoder_outputs") or {}).get(modality)
    if encoded is not None and isinstance(encoded.pooler_output, (list, tuple)):
        return [int(f.shape[0]) for f in encoded.pooler_output]
    return None
