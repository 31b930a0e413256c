"""Zero-TPrune on a timm Vision Transformer, as in the paper: tokens are pruned between blocks.

After each pruning block, that block's attention graph (recomputed from its captured attention input, so
the fused kernel keeps running) ranks the patch tokens by I' -> S -> I (see :mod:`vtprune.methods.zero_tprune`);
the block's output keeps the prefix tokens ([CLS], registers) and the surviving patches in original order,
and every later block runs on the shorter sequence.
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn

from .config import PrunerConfig
from .errors import VTPruneError
from .handle import Handle
from .methods.zero_tprune import WPROptions, ZeroTPruneConfig, wpr_iterations, zero_tprune
from .ops import AttentionGraph
from .view import budget

_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, TimmPruneHandle]" = weakref.WeakKeyDictionary()


def is_timm_vit(model: nn.Module) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (timm need not be installed). A model built by timm means
    timm's module is loaded already: importing timm only to ask would cost seconds on every ``apply`` process."""
    module = sys.modules.get("timm.models.vision_transformer")
    return module is not None and isinstance(model, module.VisionTransformer)


def default_blocks(depth: int) -> tuple[int, ...]:
    """Pruning after blocks depth//4, depth//2 and 3·depth//4 (3, 6, 9 for a 12-block DeiT): a harness
    choice, the paper's per-model placements are not public."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def stage_target(patches: int, keep: int, stage: int, stages: int) -> int:
    """Patch tokens left after pruning stage ``stage`` (0-based) of ``stages``: an equal share of the
    ``patches - keep`` removed tokens per stage, exactly ``keep`` after the last."""
    return patches - (patches - keep) * (stage + 1) // stages


class TimmPruneHandle(Handle):
    """Pruning hooks on one timm ViT; a context manager. ``seq_lens``: tokens each block processed in the
    last forward (batch-wide, prefix tokens included)."""

    def __init__(self, model: nn.Module, config: ZeroTPruneConfig, blocks: tuple[int, ...]) -> None:
        self.model, self.config, self.blocks = model, config, blocks
        self.seq_lens: list[int] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._attn_inputs: dict[int, torch.Tensor] = {}
        self._patches = 0  # patch tokens entering the first block of the current forward

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def install(self) -> None:
        model = self.model
        for i, block in enumerate(model.blocks):
            self._handles.append(block.register_forward_pre_hook(self._make_block_pre(i)))
        for stage, b in enumerate(self.blocks):
            block = model.blocks[b]
            self._handles.append(block.attn.register_forward_pre_hook(self._make_capture(b)))
            self._handles.append(block.register_forward_hook(self._make_prune(b, stage)))

    def _make_block_pre(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if index == 0:
                self.seq_lens = []
                self._patches = args[0].shape[1] - self.model.num_prefix_tokens
            self.seq_lens.append(args[0].shape[1])
        return hook

    def _make_capture(self, block: int):
        def hook(module: nn.Module, args: tuple) -> None:
            self._attn_inputs[block] = args[0]
        return hook

    def _make_prune(self, block: int, stage: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            prefix = self.model.num_prefix_tokens
            keep = budget(self.config.keep, self._patches)
            target = stage_target(self._patches, keep, stage, len(self.blocks))
            if target >= output.shape[1] - prefix:
                return None
            with torch.no_grad():
                kept = self._select(module.attn, self._attn_inputs.pop(block), block, target)
            index = torch.cat([torch.arange(prefix, device=output.device).expand(output.shape[0], -1),
                               kept + prefix], 1)
            return output.gather(1, index[..., None].expand(-1, -1, output.shape[-1]))
        return hook

    def _select(self, attn: nn.Module, x: torch.Tensor, block: int, target: int) -> torch.Tensor:
        """[B, target] kept patch indices (sorted) per sample from the block's attention graph."""
        b, n, _ = x.shape
        prefix = self.model.num_prefix_tokens
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        token = torch.cat([torch.full((prefix,), -1, device=x.device), torch.arange(n - prefix, device=x.device)])
        has_cls = getattr(self.model, "cls_token", None) is not None
        options = WPROptions.of(self.config, iters=wpr_iterations(block, len(self.model.blocks)))
        return torch.stack([
            zero_tprune([AttentionGraph(q[i], k[i], float(attn.scale), token, has_cls)], n - prefix, target,
                        options, self.config.similarity_share).indices
            for i in range(b)])

    def remove(self) -> None:
        """Remove every hook; the model behaves exactly as before. Idempotent."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._attn_inputs.clear()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

    def __repr__(self) -> str:
        return f"TimmPruneHandle({self.config if self.active else 'removed'}, blocks={self.blocks})"


def _check_attention(model: nn.Module, blocks: tuple[int, ...]) -> None:
    for b in blocks:
        attn = getattr(model.blocks[b], "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")):
            raise VTPruneError(f"block {b}'s attention is not timm's standard qkv Attention; cannot recompute it")


def apply_timm(model: nn.Module, config: PrunerConfig) -> TimmPruneHandle:
    """Install Zero-TPrune (``"zero_tprune"``, alias ``"pagerank"``) on a timm ``VisionTransformer``: ``keep``
    is the fraction / count of patch tokens left after the last pruning block (``config.vit_blocks``), removed
    in equal shares per block; prefix tokens are always kept."""
    if not is_timm_vit(model):
        raise VTPruneError(f"{type(model).__name__} is not a timm VisionTransformer")
    if not isinstance(config, ZeroTPruneConfig):
        raise VTPruneError(f"pruner {config.name!r} does not support timm ViTs; "
                           "use 'zero_tprune' (alias 'pagerank')")
    if config.merge != "none":
        raise VTPruneError(f"merge={config.merge!r} is not supported on timm ViTs (their blocks take no attention "
                           "bias); prune with merge='none'")
    depth = len(model.blocks)
    blocks = config.vit_blocks or default_blocks(depth)
    if blocks[-1] >= depth:
        raise VTPruneError(f"vit_blocks={blocks}: this ViT has {depth} blocks")
    _check_attention(model, blocks)
    if model in _ACTIVE:
        raise VTPruneError("this model already has vtprune hooks installed; call handle.remove() first")
    handle = TimmPruneHandle(model, config, blocks)
    try:
        handle.install()
    except BaseException:
        handle.remove()
        raise
    _ACTIVE[model] = handle
    return handle
