"""VTC-CLS ("[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs", arXiv 2412.05819)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import VISION_QK
from ..config import PrunerConfig
from ..errors import VTPruneError
from ..ops import captured_layers, cls_attention, graph_of, has_cls, layer_roles, pooled, received_attention
from ..registry import register_pruner
from ..view import VisualView
from .base import ScorerPruner


@dataclass
class VTCCLSConfig(PrunerConfig):
    """start_layer: first encoder layer whose [CLS] attention is summed (Python-style, negatives count from
    the end); the sum runs up to, not including, the last layer. 0 = the reference's ``start_layer=None``."""

    name = "vtc_cls"
    start_layer: int = 0

    def validate(self) -> None:
        super().validate()
        if isinstance(self.start_layer, bool) or not isinstance(self.start_layer, int):
            raise VTPruneError(f"start_layer={self.start_layer!r}: expected an int")


def summed_cls_attention(view: VisualView) -> torch.Tensor:
    """[V] head-mean [CLS] attention summed over the captured layers below the last one; for encoders
    without [CLS] (Qwen), the attention received in the last full-attention block (the shared fallback)."""
    captured = captured_layers(view)
    cls_layers, last_full = layer_roles(captured)
    if not has_cls(captured):
        return pooled([graph_of(vq) for vq in captured[last_full]], view.num_tokens, received_attention)
    graphs = [graph_of(vq) for layer in cls_layers for vq in captured[layer]]
    return pooled(graphs, view.num_tokens, cls_attention)


@register_pruner
class VTCCLSPruner(ScorerPruner):
    """VTC-CLS: keep the top-k tokens by [CLS] attention summed over encoder layers ``start_layer .. L-2``
    (head mean per layer), in original order. Only the [CLS] row of each layer is recomputed from captured
    q/k (the reference turns on ``output_attentions`` for the whole tower). Clean budget; pre-LLM.

    Choices: LLaVA-NeXT views (base + crops) are ranked together, each view's [CLS] attention being over its
    own patches; row-newline tokens rank last. Encoders without [CLS] (Qwen) use attention received in the
    last full-attention block, pooled over each 2x2 merge group; they capture the layer range too, because
    the capture layers are fixed before the encoder's kind is known (an unused q/k projection per layer).
    See docs/algorithms.md, section ``vtc_cls``."""

    reads_cls = "always"
    config_class = VTCCLSConfig
    sites = ("pre_llm",)
    needs = frozenset({VISION_QK})

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        start = self.config.start_layer
        start = max(0, num_layers + start) if start < 0 else start
        if not start < num_layers - 1:
            raise VTPruneError(f"start_layer={self.config.start_layer} leaves no layer to sum: the encoder has "
                               f"{num_layers} layers and the last one is excluded")
        return sorted(set(range(start, num_layers - 1)) | {full_attention_layers[-1]})

    def score(self, view: VisualView) -> torch.Tensor:
        return summed_cls_attention(view)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: the cost is the [CLS] rows of the vision-encoder layers (``2·P·d_v`` per layer and view),
        in encoder dims the formula does not see; the top-k itself is a sort."""
        return None
