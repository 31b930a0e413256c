"""VisionZip (CVPR 2025): dominant tokens by [CLS] attention + contextual tokens merged by key similarity."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import PROJECTOR, VISION_QK, ProjectorInput
from ..config import ModeOption, PrunerConfig, is_number
from ..errors import VTPruneError
from ..ops import ReadsEncoderAttention, best_match, cls_attention_scores, reading_graphs, token_keys, top_k
from ..registry import register_pruner
from ..view import Selection, VisualView
from .base import Pruner


@dataclass
class VisionZipConfig(PrunerConfig, ModeOption):
    """contextual: fraction of the kept tokens that are merged contextual tokens (the reference's 10 of
    64, 20 of 128, 30 of 192 = 0.15625; rounded). mode: how a contextual token merges its group, see
    :class:`VisionZipPruner`."""

    name = "visionzip"
    contextual: float = 0.15625

    def validate(self) -> None:
        super().validate()
        if not is_number(self.contextual) or not 0.0 <= self.contextual < 1.0:
            raise VTPruneError(f"contextual={self.contextual!r}: expected a fraction in [0, 1)")
        self.validate_mode()


def contextual_targets(rest: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """The reference's evenly strided targets among the remaining tokens: positions 0, step, 2·step, ...
    with ``step = max(1, ⌊|rest| / n_ctx⌋)``, the first ``n_ctx`` of them."""
    step = max(1, rest.numel() // n_ctx)
    return rest[::step][:n_ctx]


def merge_groups(inputs: torch.Tensor, targets: torch.Tensor, others: torch.Tensor, assign: torch.Tensor,
                 mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Projector inputs [n_ctx, g, d_v] of the contextual tokens and their group sizes [n_ctx] (the target and
    its assignees). ``reference``: target + mean(assigned) (+ 0 without assignees); ``clean``: the mean over
    the target and its assignees."""
    x = inputs.float()
    total = torch.zeros(targets.numel(), *x.shape[1:], device=x.device).index_add_(0, assign, x[others])
    count = torch.bincount(assign, minlength=targets.numel()).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    if mode == "reference":
        merged = x[targets] + total / count.clamp(min=1)
    else:
        merged = (x[targets] + total) / (count + 1)
    return merged.to(inputs.dtype), count.flatten() + 1


@register_pruner
class VisionZipPruner(ReadsEncoderAttention, Pruner):
    """VisionZip, text-agnostic and pre-LLM: ``k - n_ctx`` dominant tokens with the highest [CLS]
    attention (penultimate CLIP layer, head mean; Qwen: attention received in the last full-attention block,
    pooled per 2x2 group), then ``n_ctx = round(contextual·k)`` contextual tokens: evenly strided targets
    among the remaining tokens, every other remaining token assigned to its most key-similar target (head-mean
    keys of the same layer, cosine), each group merged *before* the projector and re-projected.

    Choices (documented departures from the reference, which emits ``[CLS, dominant..., contextual...]``):
    the engine keeps tokens in original order, so a contextual token sits at its target's position; no
    [CLS] token is emitted (HF LLaVA has no slot for it), so all ``k - n_ctx`` dominant tokens are patches.
    ``mode="reference"`` merges as the reference does (target + mean of assignees, which doubles a group's
    scale); ``mode="clean"`` (default) takes the plain mean of the group. LLaVA-NeXT views are compressed
    together with one global ranking (the reference gives every view the same counts); newline tokens are
    never merged and rank last. With more kept tokens than tokens with encoder features, ``n_ctx = 0``.
    Every selection carries sizes (1 for dominant tokens, the group's token count for a contextual one), so with
    ``merge="proportional"`` a contextual token's keys get ``+log(group size)`` and nothing else is merged.
    See docs/algorithms.md, section ``visionzip``."""

    reads_cls = "always"
    config_class = VisionZipConfig
    sites = ("pre_llm",)
    needs = frozenset({VISION_QK, PROJECTOR})

    def select(self, view: VisualView, k: int) -> Selection:
        proj: ProjectorInput = view.extras["projector"]
        n_ctx = round(self.config.contextual * k) if k <= int(proj.valid.sum()) else 0
        scores = cls_attention_scores(view).masked_fill(~proj.valid, float("-inf"))
        dominant = top_k(scores, k - n_ctx).indices
        ones = torch.ones(k, device=view.features.device)
        if n_ctx == 0:
            return Selection(indices=dominant, sizes=ones)
        rest_mask = proj.valid.clone()
        rest_mask[dominant] = False
        rest = rest_mask.nonzero().flatten()
        targets = contextual_targets(rest, n_ctx)
        others = rest[~torch.isin(rest, targets)]
        if others.numel() == 0:  # k = every token with encoder features: nothing left to merge
            return Selection(indices=torch.sort(torch.cat([dominant, targets])).values, sizes=ones)
        keys = token_keys(reading_graphs(view), view.num_tokens)
        assign = best_match(keys[others], keys[targets])[1]
        groups, group_sizes = merge_groups(proj.inputs, targets, others, assign, self.config.mode)
        merged = proj.project(groups)
        indices = torch.cat([dominant, targets])
        states = torch.cat([view.features[dominant], merged.to(view.features.dtype)])
        sizes = torch.cat([ones[:dominant.numel()], group_sizes.to(ones)])
        order = torch.argsort(indices)
        return Selection(indices=indices[order], embeddings=states[order], sizes=sizes[order])

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: the cost is the encoder's [CLS] rows, key matching and the re-projection of the merged
        groups, all in encoder / projector dims the formula does not see."""
        return None
