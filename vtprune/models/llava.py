"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower with [CLS], an MLP projector, one square view."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..capture import InputCapture, MLPProjector, ProjectorInput, VisionQK
from ..errors import VTPruneError
from ..view import ImageLayout
from .base import LmmsWrapper, ModelAdapter, SyntheticImage, VisionWork, tiny_text_config, tiny_tokenizer

#: the tiny LLaVA models' chat template (LLaVA-1.5 style ``USER: <image> question ASSISTANT:``)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


class LlavaAdapter(ModelAdapter):
    """LLaVA-1.5: each image is a square patch grid (CLS dropped with the "default" feature strategy)."""

    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    bench_configs = ("llava-1.5-7b", "bench-small")
    tiny_eos = "</s>"
    lmms = LmmsWrapper("vtprune_llava_hf", simple="lmms_eval.models.simple.llava_hf.LlavaHf",
                       chat="lmms_eval.models.chat.llava_hf.LlavaHf", takes=("dtype", "attn_implementation"))

    def _patch_grid(self) -> int:
        vc = self.model.config.vision_config
        return vc.image_size // vc.patch_size

    def image_counts(self, inputs: dict[str, Any]) -> list[int] | None:
        counts = super().image_counts(inputs)
        if counts is not None or inputs.get("pixel_values") is None:
            return counts
        pixels = inputs["pixel_values"]
        sizes = inputs.get("image_sizes")
        if sizes is not None:  # variable-resolution towers: one (h/p, w/p) grid per image
            patch = self.model.config.vision_config.patch_size
            return [(int(h) // patch) * (int(w) // patch) for h, w in torch.as_tensor(sizes).tolist()]
        g = self._patch_grid()
        per_image = g * g + (0 if self.model.config.vision_feature_select_strategy == "default" else 1)
        return [per_image] * pixels.shape[0]

    # ---- vision attention (CLIP-style towers with a [CLS] token) ------------------------------------
    @property
    def vision_tower(self) -> nn.Module:
        return self.backbone.vision_tower

    def _encoder_layers(self) -> nn.ModuleList:
        tower = self.backbone.vision_tower
        return (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers

    @property
    def num_vision_layers(self) -> int:
        return len(self._encoder_layers())

    def vision_attention(self, layer: int) -> nn.Module:
        return self._encoder_layers()[layer].self_attn

    def _views_qk(self, layer: int, capture: InputCapture) -> tuple[torch.Tensor, torch.Tensor, float]:
        """q/k [views, H, 1+P, hd] of every encoded view (token 0 is [CLS])."""
        attn = self.vision_attention(layer)
        hidden = capture.tensor("hidden_states", call=0)
        v, n, _ = hidden.shape
        q = attn.q_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden).view(v, n, -1, attn.head_dim).transpose(1, 2)
        return q, k, float(attn.scale)

    def _view(self, q: torch.Tensor, k: torch.Tensor, scaling: float, token_of_patch: torch.Tensor) -> VisionQK:
        return VisionQK(query=q[:, 1:], key=k[:, 1:], scaling=scaling, token_of_patch=token_of_patch,
                        cls_query=q[:, 0], cls_key=k[:, 0])

    def _token_maps(self, n_views: int, layouts: list[ImageLayout], device: torch.device
                    ) -> list[list[tuple[int, torch.Tensor]]]:
        """Per image: (encoder view index, token index of each of its patches) — one view per image."""
        if self.model.config.vision_feature_select_strategy != "default":
            raise VTPruneError("vision-encoder and projector signals need vision_feature_select_strategy='default'")
        if n_views != len(layouts):
            raise VTPruneError(f"the vision tower encoded {n_views} images but the prompt holds {len(layouts)}")
        return [[(i, torch.arange(layout.size, device=device))] for i, layout in enumerate(layouts)]

    def vision_qk(self, layer: int, capture: InputCapture, tower: InputCapture,
                  layouts: list[ImageLayout]) -> list[list[VisionQK]]:
        q, k, scaling = self._views_qk(layer, capture)
        return [[self._view(q[v], k[v], scaling, t) for v, t in maps]
                for maps in self._token_maps(q.shape[0], layouts, q.device)]

    # ---- projector ------------------------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.backbone.multi_modal_projector

    def projector_inputs(self, capture: InputCapture, tower: InputCapture, layouts: list[ImageLayout]
                         ) -> list[ProjectorInput]:
        x = capture.tensor("image_features", call=0)  # [views, P, d_v], [CLS] already dropped; later calls re-project
        out = []
        for layout, maps in zip(layouts, self._token_maps(x.shape[0], layouts, x.device)):
            inputs = x.new_zeros(layout.size, 1, x.shape[-1])
            valid = torch.zeros(layout.size, dtype=torch.bool, device=x.device)
            for v, token in maps:
                ok = token >= 0
                inputs[token[ok], 0] = x[v][ok]
                valid[token[ok]] = True
            out.append(ProjectorInput(inputs=inputs, valid=valid, project=self._project, mlp=self._mlp()))
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x[:, 0])

    def _mlp(self) -> MLPProjector | None:
        p = self.projector
        if all(hasattr(p, n) for n in ("linear_1", "act", "linear_2")):
            return MLPProjector(first=p.linear_1, act=p.act, last=p.linear_2)
        return None

    # ---- family level: FLOPs, tiny model, benchmark image -----------------------------------------------
    @classmethod
    def vision_work(cls, config: Any, inputs: Mapping[str, Any]) -> VisionWork:
        pixels = inputs.get("pixel_values")
        return VisionWork() if pixels is None else VisionWork(views=int(pixels.shape[0]))

    @classmethod
    def vision_flops(cls, config: Any, work: VisionWork) -> dict[str, int]:
        """CLIP tower (every layer) + LLaVA projector for ``work.views`` square views."""
        vc = config.vision_config
        patches = (vc.image_size // vc.patch_size) ** 2
        s, dv = patches + 1, vc.hidden_size  # + CLS
        conv = 2 * patches * dv * vc.num_channels * vc.patch_size ** 2
        layer = 2 * s * (4 * dv * dv + 2 * dv * vc.intermediate_size) + 4 * s * s * dv
        feature_layers = config.vision_feature_layer
        n_feat = len(feature_layers) if isinstance(feature_layers, (list, tuple)) else 1
        tokens = patches + (0 if config.vision_feature_select_strategy == "default" else 1)
        d = config.text_config.hidden_size
        proj = 2 * tokens * (dv * n_feat * d + d * d)
        return {"vision": work.views * (conv + vc.num_hidden_layers * layer), "projector": work.views * proj}

    @classmethod
    def _tiny_common(cls, num_layers: int) -> tuple[Any, dict[str, Any]]:
        """(tokenizer, config keyword arguments) shared by the tiny LLaVA families: a 2-layer 56-px CLIP tower
        with 14-px patches (a 4x4 grid) and a Llama decoder."""
        tok = tiny_tokenizer(["<pad>", "<s>", "</s>", "<image>"], CHAT_TEMPLATE)
        tok.image_token = "<image>"
        vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, image_size=56, patch_size=14, projection_dim=64)
        text = dict(model_type="llama", **tiny_text_config(len(tok), num_hidden_layers=num_layers))
        return tok, dict(text_config=text, vision_config=vision,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=0)

    @classmethod
    def tiny_parts(cls, num_layers: int) -> tuple[Any, Any]:
        import transformers as tf

        tok, common = cls._tiny_common(num_layers)
        improc = tf.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        proc = tf.LlavaProcessor(improc, tok, patch_size=14, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
        return tf.LlavaConfig(**common, image_seq_length=16), proc

    @classmethod
    def synthetic_image(cls, config: Any, size: tuple[int, int] | None, generator: torch.Generator
                        ) -> SyntheticImage:
        """One ``image_size²`` view whatever ``size`` says (LLaVA-1.5 resizes every image to it)."""
        vc = config.vision_config
        side = vc.image_size
        n_visual = (side // vc.patch_size) ** 2 + (config.vision_feature_select_strategy != "default")
        pixels = torch.randn(1, vc.num_channels, side, side, generator=generator)
        return SyntheticImage(pixels, torch.full((n_visual,), config.image_token_id), {})
