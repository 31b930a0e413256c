"""ZOO-Prune (arXiv 2509.24837; docs/algorithms.md, ``zoo``): zeroth-order (ZO) projector sensitivity +
Sensitivity-Aware Diverse Selection (:func:`vtprune.ops.sads`).

``S(i) = (1/m) Σ_j ‖M(x_i + h·u_j) - M(x_i - h·u_j)‖₂ / (2h)``: central differences of the multimodal
projector ``M`` along ``m`` unit directions shared by every token, ≈ ``E_u ‖J(x_i) u‖₂`` for small ``h``.
It works on a :class:`~vtprune.capture.ProjectorInput`, whose ``project`` it runs as a black box (reference mode,
projectors of no known structure) or whose :class:`~vtprune.capture.MLPProjector` structure it exploits (clean mode):

* LLaVA / LLaVA-NeXT: ``x_i`` is one CLIP feature (g = 1), ``M`` the 2-layer MLP.
* Qwen2-VL / Qwen2.5-VL: ``x_i`` is the concatenation of the 4 *pre-norm* patch vectors of a 2×2 group
  (g = 4; the recommended definition, see docs/algorithms.md) and ``M`` the whole PatchMerger (norm + MLP). The adapter
  already orders groups like the LLM tokens (raster order, Qwen2.5-VL window order undone).
* Tokens without projector input (LLaVA-NeXT's row-newline tokens) get the smallest sensitivity of the
  image's other tokens: they are never preferred on sensitivity, and stay selectable.

:class:`LowRankLinears` optionally replaces every linear layer of the projector by its rank-r truncated SVD
for the sensitivity pass only, as the reference does on LLaVA-NeXT (rank 128), to cut its cost.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from .. import ops
from ..capture import PROJECTOR, MLPProjector, ProjectorInput
from ..config import ModeOption, PrunerConfig, check_int, is_number
from ..errors import VTPruneError
from ..registry import register_pruner
from ..view import ImageLayout, Selection, VisualView, anyres_view_labels
from .base import Pruner

#: perturbed projector evaluations per chunk, bounding memory to about this many output rows at a time
CHUNK_ROWS = 8192
#: ``precision`` values: the structured estimator's last-layer product in the projector's dtype, or a forced one
PRECISIONS = {"model": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ZOOptions:
    """Options of the ZO sensitivity estimate, shared by every pruner that uses it.

    directions: m, the number of random unit directions (default 64, as the reference).
    step:       h, the central-difference step (default 0.01).
    rank:       if set, the sensitivity pass uses a rank-``rank`` truncated SVD of each projector linear layer
                (biases kept; the selected tokens' embeddings still come from the real projector).
    precision:  dtype of the structured estimator's one large product (the central differences times the last
                layer, m·d_h·D multiply-adds per token): ``"model"`` (default) the projector's own dtype, as the
                prefill runs (a float32 model is unchanged; a bf16 model runs it in bf16 instead of float32), or a
                forced ``"float32"`` / ``"bfloat16"`` / ``"float16"``. The differences themselves are always formed in
                float32 (they cancel), and norms are taken in float32. The reference mode runs the projector as a
                black box in its own dtype, so it accepts only ``"model"``.
    """

    directions: int = 64
    step: float = 0.01
    rank: int | None = None
    precision: str = "model"

    def validate_zo(self) -> None:
        """Raise :class:`VTPruneError` naming the offending field."""
        check_int(self, "directions", 1, "number of ZO directions")
        if not is_number(self.step) or not 0 < self.step < math.inf:
            raise VTPruneError(f"step={self.step!r}: expected a finite float > 0 (central-difference step h)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise VTPruneError(f"rank={self.rank!r}: expected None (full-rank projector) or an int >= 1")
        if not isinstance(self.precision, str) or self.precision not in PRECISIONS:
            raise VTPruneError(f"precision={self.precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}")
        if self.precision != "model" and getattr(self, "reference", False):
            raise VTPruneError(f"precision={self.precision!r} with mode='reference': the reference runs the projector "
                               "in its own dtype; use precision='model' (the default)")


def unit_directions(m: int, dim: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """[m, dim] directions ``u ~ N(0, I)`` scaled to unit norm (``u / (‖u‖ + 1e-12)``), drawn in ``dtype``
    on the generator's device."""
    u = torch.randn(m, dim, generator=generator, dtype=dtype, device=generator.device)
    return u / (u.norm(dim=-1, keepdim=True) + 1e-12)


def central_difference_sensitivity(inputs: torch.Tensor, project, directions: torch.Tensor, step: float
                                   ) -> torch.Tensor:
    """[n] mean over directions of ``‖M(x + h·u) - M(x - h·u)‖ / (2h)``.

    inputs [n, g, d_v], directions [m, g·d_v] (shared by all tokens), project: [N, g, d_v] -> [N, D]. The
    perturbed inputs are formed in the projector's input dtype; norms and means are taken in float32.
    Tokens are processed in chunks so that at most about :data:`CHUNK_ROWS` perturbed rows exist at once."""
    n, g, d = inputs.shape
    m = directions.shape[0]
    delta = (step * directions.to(inputs.dtype)).view(1, m, g, d)
    out = torch.empty(n, dtype=torch.float32, device=inputs.device)
    per_chunk = max(1, CHUNK_ROWS // (2 * m))
    for start in range(0, n, per_chunk):
        x = inputs[start:start + per_chunk, None]
        c = x.shape[0]
        both = torch.cat([(x + delta).reshape(c * m, g, d), (x - delta).reshape(c * m, g, d)])
        y = project(both).float()
        diff = (y[:c * m] - y[c * m:]).view(c, m, -1)
        out[start:start + c] = diff.norm(dim=-1).mean(-1) / (2 * step)
    return out


def mlp_sensitivity(inputs: torch.Tensor, mlp: MLPProjector, directions: torch.Tensor, step: float,
                    out_factor: torch.Tensor) -> torch.Tensor:
    """The same central differences for a ``Linear -> act -> Linear`` projector (after a per-vector norm:
    :class:`NormedFirstLayer`), computed without the
    wasted work: ``W1(x ± h·u) + b1 = a(x) ± h·W1 u`` shares the first layer across tokens and directions,
    the biases of the last layer cancel, and ``‖W2 z‖ = ‖Σ Vᵀ z‖`` (``W2 = U Σ Vᵀ``), so the last layer is
    replaced by ``out_factor`` (:func:`output_factor`: W2 itself or its QR's R at full rank, ``Σᵣ Vᵣᵀ`` at rank r).
    Per token this costs m·d_h·r multiply-adds instead of 2m·(d_v·d_h + d_h·D), in ``out_factor``'s dtype (the
    differences are formed in float32 and rounded to it only for that product)."""
    n = inputs.shape[0]
    m = directions.shape[0]
    pre = (LinearFirstLayer if mlp.norm is None else NormedFirstLayer)(inputs, mlp, directions, step)
    factor_t = out_factor.T
    out = torch.empty(n, dtype=torch.float32, device=inputs.device)
    per_chunk = max(1, CHUNK_ROWS // m)
    for start in range(0, n, per_chunk):
        plus, minus = pre(slice(start, start + per_chunk))
        diff = mlp.act(plus) - mlp.act(minus)  # [c, m, d_h]
        moved = diff.to(factor_t.dtype) @ factor_t
        out[start:start + diff.shape[0]] = moved.float().norm(dim=-1).mean(-1) / (2 * step)
    return out


class LinearFirstLayer:
    """The first layer's pre-activations ``W1(x ± h·u) + b1 = a(x) ± h·W1 u`` of a projector without a norm (the g
    inputs of a token concatenated), for every token and direction: one pass of the layer for the tokens, one for the
    directions."""

    def __init__(self, inputs: torch.Tensor, mlp: MLPProjector, directions: torch.Tensor, step: float) -> None:
        first = mlp.first
        self.base = F.linear(inputs.flatten(1), first.weight, first.bias).float()  # [n, d_h]
        self.shift = step * F.linear(directions.to(first.weight.dtype), first.weight).float()  # [m, d_h]

    def __call__(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-activations of the tokens ``rows`` for +h and -h: two [c, m, d_h]."""
        a = self.base[rows, None]
        return a + self.shift, a - self.shift


class NormedFirstLayer:
    """The first layer's pre-activations ``W1·concat_p norm(x_p ± h·u_p) + b1`` of a projector that normalises its
    input first, vector by vector (:attr:`MLPProjector.norm`, LayerNorm or RMSNorm), for every token and
    direction without running the layer per direction. A norm is ``γ ⊙ c(v) / s(v) + β`` with ``c`` linear (the
    centring, or nothing for RMSNorm) and ``s`` a scalar per vector, so with ``A_p = W1_p (γ ⊙ c(x_p))`` per token
    and ``B_p = W1_p (γ ⊙ c(u_p))`` per direction (one first-layer pass each) the pre-activation is
    ``Σ_p (A_p ± h·B_p) / s_p± + W1 β + b1``, where
    ``s_p±² = (‖c(x_p)‖² ± 2h c(x_p)·c(u_p) + h²‖c(u_p)‖²) / d + ε`` needs only dot products. Float32."""

    def __init__(self, inputs: torch.Tensor, mlp: MLPProjector, directions: torch.Tensor, step: float) -> None:
        norm, weight = mlp.norm, mlp.first.weight.float()  # [d_h, g·d_v]
        layer = isinstance(norm, torch.nn.LayerNorm)
        d = norm.normalized_shape[-1] if layer else norm.weight.shape[-1]  # the width one norm acts on
        n, width = inputs.shape[0], inputs[0].numel()
        if width % d or weight.shape[1] != width:
            raise VTPruneError(f"projector norm over {d} values and first layer over {weight.shape[1]} inputs: expected "
                               f"the {width} inputs of a token as whole {d}-wide vectors")
        g = width // d  # the vectors normalised one by one (Qwen: 4 patches; InternVL: 1, all channels at once)
        gamma = norm.weight.float() if norm.weight is not None else torch.ones(d, device=inputs.device)
        beta = getattr(norm, "bias", None) if layer else None
        self.eps = float(norm.eps if layer else norm.variance_epsilon)
        x, u = inputs.float().reshape(n, g, d), directions.float().view(-1, g, d)
        cx, cu = (x - x.mean(-1, keepdim=True), u - u.mean(-1, keepdim=True)) if layer else (x, u)
        per_member = weight.view(-1, g, d).permute(1, 2, 0)  # [g, d, d_h]: W1_p transposed
        self.a = torch.bmm((gamma * cx).transpose(0, 1), per_member).transpose(0, 1)  # [n, g, d_h]
        self.b = step * torch.bmm((gamma * cu).transpose(0, 1), per_member)  # [g, m, d_h]: h·B_p
        const = mlp.first.bias.float() if mlp.first.bias is not None else weight.new_zeros(weight.shape[0])
        self.const = const if beta is None else const + weight @ beta.float().repeat(g)
        self.var_x = cx.square().mean(-1)  # [n, g]
        self.cross = 2 * step * torch.einsum("ngd,mgd->nmg", cx, cu) / d  # [n, m, g]
        self.var_u = step * step * cu.square().mean(-1)  # [m, g]

    def __call__(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The pre-activations of the tokens ``rows`` for +h and -h: two [c, m, d_h]."""
        a, base = self.a[rows], (self.var_x[rows, None] + self.var_u[None] + self.eps)  # [c, g, d_h], [c, m, g]
        out = []
        for sign in (1.0, -1.0):
            r = (base + sign * self.cross[rows]).rsqrt()  # [c, m, g]: 1 / s_p±
            own = torch.bmm(r, a)  # [c, m, d_h]: Σ_p A_p / s_p±
            moved = torch.bmm(r.permute(1, 0, 2), self.b.transpose(0, 1)).transpose(0, 1)  # Σ_p h·B_p / s_p±
            out.append(own + sign * moved + self.const)
        return out[0], out[1]


def output_factor(weight: torch.Tensor, rank: int | None) -> torch.Tensor:
    """A matrix F with ``‖weight @ z‖ = ‖F z‖`` (full rank) or its rank-``rank`` truncation ``Σᵣ Vᵣᵀ``.

    Full rank needs no SVD (a 4096² one is what made the first GPU run take ~1 s per image): the weight itself
    when it has no more rows than columns, else the R of its QR (``weight = Q R``, Q orthonormal: fewer rows)."""
    w = weight.detach().float()
    if rank is None or rank >= min(w.shape):
        return w if w.shape[0] <= w.shape[1] else torch.linalg.qr(w, mode="r").R
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    return s[:rank, None] * vh[:rank]


#: factors derived from projector weights, shared by every pruner instance (a new ``apply`` must not redo an SVD):
#: weight -> {key: (weight version, value)}, dropped with the weight
_WEIGHT_CACHE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def cached_for_weight(weight: torch.Tensor, key: tuple, compute):
    """``compute()`` once per (weight, key), recomputed when the weight is modified in place."""
    per_weight = _WEIGHT_CACHE.setdefault(weight, {})
    hit = per_weight.get(key)
    if hit is None or hit[0] != weight._version:
        hit = per_weight[key] = (weight._version, compute())
    return hit[1]


def projector_sensitivity(proj: ProjectorInput, directions: torch.Tensor, step: float,
                          lowrank: LowRankLinears | None = None, out_factor: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """[V] ZO sensitivity of one image's tokens; tokens without projector input get the smallest valid value.
    With ``out_factor`` (see :func:`output_factor`) and an MLP projector the structured estimator is used."""
    valid = proj.valid
    if not bool(valid.any()):
        raise VTPruneError("ZO sensitivity needs at least one visual token with projector input")
    with torch.no_grad():
        if out_factor is not None and proj.mlp is not None:
            s = mlp_sensitivity(proj.inputs[valid], proj.mlp, directions, step, out_factor)
        else:
            with lowrank if lowrank is not None else nullcontext():
                s = central_difference_sensitivity(proj.inputs[valid], proj.project, directions, step)
    out = torch.empty(valid.shape[0], dtype=torch.float32, device=s.device)
    out[valid] = s
    out[~valid] = s.min()
    return out


class LowRankLinears(TorchFunctionMode):
    """While active, every ``F.linear`` whose weight has rank > ``rank`` runs as ``(x Vᵣ) (Uᵣ Σᵣ)ᵀ + b``,
    the rank-``rank`` truncated SVD of its weight (bias kept), like the reference's LLaVA-NeXT projector.

    Works on any projector built from linear layers (LLaVA MLP, Qwen PatchMerger MLP) without touching the
    model. Factors are computed from the weights actually in use (so they reflect the loaded checkpoint, the
    caveat in docs/algorithms.md, zoo) and cached per weight tensor (recomputed if it is modified in place)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [in, r], up [r, out]) with ``weight ≈ (down @ up)ᵀ``, in the weight's dtype."""
        def compute() -> tuple[torch.Tensor, torch.Tensor]:
            u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            r = self.rank
            return vh[:r].T.contiguous().to(weight.dtype), (u[:, :r] * s[:r]).T.contiguous().to(weight.dtype)

        return cached_for_weight(weight, ("lowrank", self.rank), compute)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if min(weight.shape) > self.rank:
                down, up = self.factors(weight)
                y = (x @ down) @ up
                return y if bias is None else y + bias
        return func(*args, **kwargs)


class ZOScorer:
    """ZO sensitivity of a view's tokens under fixed :class:`ZOOptions`; holds the low-rank factor cache.

    ``reference=True`` reproduces the reference: directions drawn in the projector inputs' dtype (fp16 on
    LLaVA), black-box central differences, ``rank`` = truncated SVD of every projector layer. Otherwise
    directions are drawn in float32 (the draw does not depend on the model's dtype) and MLP projectors use
    the structured estimator :func:`mlp_sensitivity` (same value at full rank, several times cheaper; with
    ``rank`` only the last layer is truncated), Qwen's PatchMerger included (its per-patch norm, see
    :class:`NormedFirstLayer`) and InternVL's projector; other projectors (Gemma 3's) stay black boxes, every layer
    truncated to ``rank`` as in the reference mode. Set :attr:`directions` ([m, g·d_v]) to inject the exact direction
    bank of a reference run."""

    def __init__(self, options: ZOOptions, reference: bool = False) -> None:
        self.options = options
        self.reference = reference
        self.lowrank = LowRankLinears(options.rank) if options.rank is not None else None
        self.directions: torch.Tensor | None = None

    def _out_factor(self, proj: ProjectorInput) -> torch.Tensor | None:
        """The last layer's factor for :func:`mlp_sensitivity`, in the product's dtype (``precision``)."""
        if self.reference or proj.mlp is None:
            return None
        weight, rank = proj.mlp.last.weight, self.options.rank
        dtype = PRECISIONS[self.options.precision] or weight.dtype
        return cached_for_weight(weight, ("out", rank, dtype), lambda: output_factor(weight, rank).to(dtype))

    def __call__(self, extras: dict, generator: torch.Generator) -> torch.Tensor:
        """[V] sensitivities of the image whose ``VisualView.extras`` are given."""
        proj = extras.get("projector")
        if proj is None:
            raise VTPruneError("ZO sensitivity needs the 'projector' signal (declare it in Pruner.needs)")
        _, g, d = proj.inputs.shape
        dtype = proj.inputs.dtype if self.reference else torch.float32
        u = self.directions
        if u is None:
            u = unit_directions(self.options.directions, g * d, generator, dtype)
        elif u.dim() != 2 or u.shape[1] != g * d:
            raise VTPruneError(f"injected directions have shape {tuple(u.shape)}, expected [m, {g * d}]")
        black_box = self.reference or proj.mlp is None  # rank truncates every layer; else only the last
        return projector_sensitivity(proj, u.to(proj.inputs.device), self.options.step,
                                     self.lowrank if black_box else None, self._out_factor(proj))


# ---- the method -------------------------------------------------------------------------------------------
@dataclass
class ZooConfig(PrunerConfig, ZOOptions, ModeOption):
    """ZOO-Prune. Sensitivity options: ``directions`` (m = 64), ``step`` (h = 0.01), ``rank`` (None = full-rank
    projector; e.g. 128, much cheaper), ``precision`` (see :class:`ZOOptions`). Directions come from the pruner's
    seeded generator, one bank per image shared by all its tokens. On LLaVA's MLP projector and Qwen's PatchMerger
    the clean mode computes the same central differences with the structured estimator of :func:`mlp_sensitivity` (identical at full rank;
    ``rank`` truncates the last layer's SVD); the reference mode runs the projector as a black box, with
    ``rank`` truncating every layer as the reference's low-rank LLaVA-NeXT projector does.

    mode="clean" (default): SADS over all of an image's tokens with the exact budget; cosine in float32;
    LLaVA-NeXT newline tokens (no projector input) get the image's smallest sensitivity (see
    :func:`projector_sensitivity`), so SADS takes them last.
    mode="reference": the reference code's rules — directions drawn and cosine computed in the model's dtype;
    count ``⌊ρ·V⌋`` (LLaVA-1.5; also used for Qwen, which has no reference code); on LLaVA-NeXT, per-view
    budgets ``⌊⌊5g²·ρ⌋ / views⌋`` (5g² = the hard-coded 2880 for g = 24), SADS within each view (per-view
    normalisation), plus the tokens at the *un-offset* newline indices ``r·(cols+1) + cols``.
    The reference's kept count then drops by the overlaps between those tokens and the SADS picks, which
    the engine's exact-count contract cannot express: overlaps are refilled with the most sensitive unkept
    tokens (the one deviation)."""

    name = "zoo"

    def validate(self) -> None:
        super().validate()
        self.validate_zo()
        self.validate_mode()


def floored_count(keep: float | int, num_tokens: int) -> int:
    """The ZOO-Prune LLaVA-1.5 count rule: ``⌊ρ·V⌋`` (at least 1); an int keep is a token count capped by V."""
    if isinstance(keep, float):
        return max(1, min(num_tokens, math.floor(keep * num_tokens)))
    return min(int(keep), num_tokens)


@functools.lru_cache(maxsize=64)
def anyres_views(layout: ImageLayout) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For an AnyRes (LLaVA-NeXT) layout: (view label of every token, :func:`vtprune.view.anyres_view_labels`;
    the reference's un-offset newline indices). ``None`` for other layouts."""
    labels = anyres_view_labels(layout)
    if labels is None:
        return None
    rows, cols = layout.segments[1].rows, layout.segments[1].cols
    return labels, torch.arange(rows) * (cols + 1) + cols


@register_pruner
class ZooPruner(Pruner):
    """Score = ZO sensitivity of the projector, select = SADS on the projected features. Pre-LLM only
    (the method is defined at the projector). See docs/algorithms.md, section ``zoo``."""

    config_class = ZooConfig
    sites = ("pre_llm",)
    needs = frozenset({PROJECTOR})

    def __init__(self, config: ZooConfig) -> None:
        super().__init__(config)
        self.scorer = ZOScorer(config, reference=config.reference)

    @classmethod
    def overhead_flops(cls, before: int, kept: int, dim: int) -> None:
        """``None``: the cost is dominated by the 2m perturbed projector evaluations per token (structured:
        ``m·d_h·r``), in projector dims the formula does not see; SADS adds ``2·V·D·k``."""
        return None

    def count(self, layout: ImageLayout) -> int:
        if not self.config.reference:
            return super().count(layout)
        views = anyres_views(layout)
        if views is None:
            return floored_count(self.config.keep, layout.size)
        labels, quirk = views
        return self._per_view_budget(layout, labels) * int(labels.max() + 1) + quirk.numel()

    def _per_view_budget(self, layout: ImageLayout, labels: torch.Tensor) -> int:
        """``⌊K / views⌋`` with ``K = ⌊5g²·ρ⌋`` (the reference's hard-coded 2880) or the int keep."""
        keep, nominal = self.config.keep, 5 * layout.segments[0].size
        total = math.floor(nominal * keep) if isinstance(keep, float) else keep
        return total // int(labels.max() + 1)

    @torch.no_grad()
    def select(self, view: VisualView, k: int) -> Selection:
        sens = self.scorer(view.extras, self.generator(view))
        dtype = view.features.dtype if self.config.reference else torch.float32
        unit = ops.unit_rows(view.features, dtype)
        views = anyres_views(view.layout) if self.config.reference else None
        if views is None:
            picks = ops.sads(ops.on_demand(unit), sens, k)
        else:
            picks = self._reference_per_view(view.layout, unit, sens, k, *views)
        return Selection(indices=torch.sort(picks).values)

    def _reference_per_view(self, layout: ImageLayout, unit: torch.Tensor, sens: torch.Tensor, k: int,
                            labels: torch.Tensor, quirk: torch.Tensor) -> torch.Tensor:
        """LLaVA-NeXT reference: SADS within each view, union the un-offset newline indices, then refill
        overlaps with the most sensitive unkept tokens so that exactly k remain."""
        labels, quirk = labels.to(unit.device), quirk.to(unit.device)
        per_view = self._per_view_budget(layout, labels)
        parts = [quirk]
        for v in range(int(labels.max()) + 1):
            idx = (labels == v).nonzero().flatten()
            kv = min(per_view, idx.numel())
            if kv:
                parts.append(idx[ops.sads(ops.on_demand(unit[idx]), sens[idx], kv)])
        kept = torch.unique(torch.cat(parts))
        if kept.numel() < k:  # newline tokens only after every grid token, kept tokens never
            rest = sens.masked_fill(labels < 0, float(sens.min()) - 1).index_fill(0, kept, float("-inf"))
            kept = torch.cat([kept, torch.sort(rest, descending=True, stable=True).indices[:k - kept.numel()]])
        return kept
