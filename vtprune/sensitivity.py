"""Zeroth-order (ZO) projector sensitivity, the importance signal of ZOO-Prune (spec ``algorithms.md`` §1.3).

``S(i) = (1/m) Σ_j ‖M(x_i + h·u_j) - M(x_i - h·u_j)‖₂ / (2h)``: central differences of the multimodal
projector ``M`` along ``m`` unit directions shared by every token, ≈ ``E_u ‖J(x_i) u‖₂`` for small ``h``.
It works on a :class:`~vtprune.capture.ProjectorInput`, treating ``project`` as a black box:

* LLaVA / LLaVA-NeXT: ``x_i`` is one CLIP feature (g = 1), ``M`` the 2-layer MLP.
* Qwen2-VL / Qwen2.5-VL: ``x_i`` is the concatenation of the 4 *pre-norm* patch vectors of a 2×2 group
  (g = 4; the recommended definition of §1.7) and ``M`` the whole PatchMerger (norm + MLP). The adapter
  already orders groups like the LLM tokens (raster order, Qwen2.5-VL window order undone).
* Tokens without projector input (LLaVA-NeXT's row-newline tokens) get the smallest sensitivity of the
  image's other tokens: they are never preferred on sensitivity, and stay selectable.

:class:`LowRankLinears` optionally replaces every linear layer of the projector by its rank-r truncated SVD
for the sensitivity pass only, as the reference does on LLaVA-NeXT (rank 128), to cut its cost.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from .capture import MLPProjector, ProjectorInput
from .config import is_number
from .errors import VTPruneError

#: perturbed projector evaluations per chunk, bounding memory to about this many output rows at a time
CHUNK_ROWS = 8192


@dataclass
class ZOOptions:
    """Options of the ZO sensitivity estimate, shared by every pruner that uses it.

    directions: m, the number of random unit directions (default 64, as the reference).
    step:       h, the central-difference step (default 0.01).
    rank:       if set, the sensitivity pass uses a rank-``rank`` truncated SVD of each projector linear layer
                (biases kept; the selected tokens' embeddings still come from the real projector).
    """

    directions: int = 64
    step: float = 0.01
    rank: int | None = None

    def validate_zo(self) -> None:
        """Raise :class:`VTPruneError` naming the offending field."""
        if isinstance(self.directions, bool) or not isinstance(self.directions, int) or self.directions < 1:
            raise VTPruneError(f"directions={self.directions!r}: expected an int >= 1 (number of ZO directions)")
        if not is_number(self.step) or not 0 < self.step < math.inf:
            raise VTPruneError(f"step={self.step!r}: expected a finite float > 0 (central-difference step h)")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise VTPruneError(f"rank={self.rank!r}: expected None (full-rank projector) or an int >= 1")


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
    """The same central differences for a ``Linear -> act -> Linear`` projector, computed without the
    wasted work: ``W1(x ± h·u) + b1 = a(x) ± h·W1 u`` shares the first layer across tokens and directions,
    the biases of the last layer cancel, and ``‖W2 z‖ = ‖Σ Vᵀ z‖`` (``W2 = U Σ Vᵀ``), so the last layer is
    replaced by ``out_factor = Σ Vᵀ`` [r, d_h] — exact at full rank, a rank-r truncation otherwise.
    Per token this costs m·d_h·r multiply-adds instead of 2m·(d_v·d_h + d_h·D)."""
    n, _, d = inputs.shape
    m = directions.shape[0]
    first = mlp.first
    base = F.linear(inputs[:, 0], first.weight, first.bias).float()  # [n, d_h]
    shift = step * F.linear(directions.to(first.weight.dtype), first.weight).float()  # [m, d_h]
    factor = out_factor.float()
    out = torch.empty(n, dtype=torch.float32, device=inputs.device)
    per_chunk = max(1, CHUNK_ROWS // m)
    for start in range(0, n, per_chunk):
        a = base[start:start + per_chunk, None]
        diff = mlp.act(a + shift) - mlp.act(a - shift)  # [c, m, d_h]
        out[start:start + a.shape[0]] = (diff @ factor.T).norm(dim=-1).mean(-1) / (2 * step)
    return out


def output_factor(weight: torch.Tensor, rank: int | None) -> torch.Tensor:
    """``Σ Vᵀ`` of ``weight = U Σ Vᵀ`` (top-``rank`` rows when given): ``‖weight @ z‖ = ‖Σ Vᵀ z‖``."""
    _, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    r = s.shape[0] if rank is None else min(rank, s.shape[0])
    return s[:r, None] * vh[:r]


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
    caveat of spec §1.6) and cached per weight tensor (recomputed if it is modified in place)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank
        self._factors = WeakTensorKeyDictionary()  # weight -> (version, down, up)

    def factors(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down [in, r], up [r, out]) with ``weight ≈ (down @ up)ᵀ``, in the weight's dtype."""
        cached = self._factors.get(weight)
        if cached is None or cached[0] != weight._version:
            u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
            r = self.rank
            down = vh[:r].T.contiguous().to(weight.dtype)
            up = (u[:, :r] * s[:r]).T.contiguous().to(weight.dtype)
            cached = self._factors[weight] = (weight._version, down, up)
        return cached[1], cached[2]

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
    ``rank`` only the last layer is truncated). Set :attr:`directions` ([m, g·d_v]) to inject the exact
    direction bank of a reference run (spec §1.10)."""

    def __init__(self, options: ZOOptions, reference: bool = False) -> None:
        self.options = options
        self.reference = reference
        self.lowrank = LowRankLinears(options.rank) if options.rank is not None and reference else None
        self.directions: torch.Tensor | None = None
        self._factors = WeakTensorKeyDictionary()  # last-layer weight -> (version, Σ Vᵀ)

    def _out_factor(self, proj: ProjectorInput) -> torch.Tensor | None:
        if self.reference or proj.mlp is None:
            return None
        weight = proj.mlp.last.weight
        cached = self._factors.get(weight)
        if cached is None or cached[0] != weight._version:
            cached = self._factors[weight] = (weight._version, output_factor(weight, self.options.rank))
        return cached[1]

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
        return projector_sensitivity(proj, u.to(proj.inputs.device), self.options.step, self.lowrank,
                                     self._out_factor(proj))
