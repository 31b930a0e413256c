"""Why Zero-TPrune selects about as well as random on the testbeds: a diagnostic of its attention graph.

On ``N`` seeded held-out questions per testbed (LLaVA: CLIP tower with [CLS], read at the penultimate layer;
Qwen2-VL: no [CLS], read at the last block), one pruned forward records the ``VisualView`` that vtprune's
``zero_tprune`` sees (every encoder layer's q/k captured); everything below is then computed on those views with
the functions vtprune itself runs (``weighted_pagerank``, ``informative_heads``, ``rms_heads``,
``similarity_stage``, ``zero_tprune``), against the testbed's per-token priorities
(``vtprune.testbed.export.token_priorities``: 2 = question target, 1 = other object, 0 = background).

(a) **Concentration** of the encoder attention graph, per layer and head: normalised entropy of the received
    attention (column means of ``A_h``, a distribution over the N nodes; 1 = uniform), the share of that mass on
    the top 5 % of nodes and on the single top node, the [CLS] node's share, which part of the top 5 % are
    object patches (vs the object share of all patches), the AUC of received attention for object tokens, and
    the "vote" of each group: the attention mass background queries put on background keys and object queries
    on object keys (each against the group's share of the keys).
(b) **Scores vs object tokens** at the layer zero_tprune reads: the I-stage score (weighted PageRank + head
    filter + RMS) with and without the head filter, after 1 iteration (the paper's rule for deep layers, vtprune's
    default) and to convergence (50 iterations, L1 tol 1e-6), [CLS]-boosted and uniform start (LLaVA only; Qwen
    has no [CLS]); the full I'->S->I selection; [CLS] attention of the read layer and VTC-CLS's summed [CLS]
    attention (Qwen: both are the received-attention fallback); head-mean received attention and its reverse;
    the best head for hindsight; random; the question-target informed oracle. Per method: AUC for object tokens
    (priority >= 1) and for target tokens (priority 2), and at keep 0.25 / 0.11 the mean priority of the kept
    tokens and the share of object / target tokens kept.
(c) **Head filter**: per layer and head, the variance of the 1-iteration scores rescaled to mean 1 (the scale
    ``informative_heads`` applies its bounds on), how many heads pass the bounds per image (and how often none
    does, so all heads are used), and the object AUC of the heads that pass vs those that do not.
(d) **Similarity stage** at keep 0.25 / 0.11: share of the S-stage's removals that are object / target tokens,
    and the S-stage's share of all object / target tokens the full method removes.

Writes ``<out>.json`` (aggregates only) and ``<out>.md`` (tables). CPU, one thread (about 30 s of CPU per testbed
at N = 200; 3 min wall-clock for both on the shared 2-core machine):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/zero_tprune_diagnostic.py --n 200 --seed 0 \\
        --out bench/results/zero_tprune_diagnostic
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

import vtprune
from vtprune.methods.vtc_cls import summed_cls_attention
from vtprune.methods.zero_tprune import (
    HEAD_VARIANCE,
    WPROptions,
    ZeroTPruneConfig,
    ZeroTPrunePruner,
    fed_tokens,
    pagerank_init,
    similarity_stage,
    zero_tprune,
)
from vtprune.ops import (
    AttentionGraph,
    attention_rows,
    captured_layers,
    graph_of,
    informative_heads,
    pooled,
    reading_graphs,
    received_attention,
    rms_heads,
    top_k,
    weighted_pagerank,
)
from vtprune.registry import _REGISTRY, register_pruner
from vtprune.testbed.dataset import Item, _load_entry
from vtprune.testbed.export import HELDOUT_FILE, token_priorities
from vtprune.testbed.model import FAMILIES, IMAGE_SIZE, load_checkpoint, prompt
from vtprune.view import VisualView, budget

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "eval" / "testbed" / "checkpoints"
KEEPS = (0.25, 0.11)
TOP_SHARE = 0.05  # "top 5 % of nodes"
CONVERGED = {"iters": 50, "tol": 1e-6}  # docs/algorithms.md: "to convergence"


# ---- data and views ------------------------------------------------------------------------------------------
def held_out(family: str, n: int, seed: int) -> list[tuple[Item, Any]]:
    """``n`` held-out items drawn without replacement by ``seed`` (in file order), rendered for ``family``."""
    entries = json.loads(gzip.decompress(HELDOUT_FILE.read_bytes()))["items"]
    n = min(n, len(entries))
    chosen = sorted(np.random.default_rng(seed).choice(len(entries), size=n, replace=False).tolist())
    return [_load_entry(entries[i], IMAGE_SIZE[family]) for i in chosen]


@dataclass
class _ProbeConfig(ZeroTPruneConfig):
    name = "_zero_tprune_diagnostic"


class _Probe(ZeroTPrunePruner):
    """zero_tprune that captures every encoder layer (the read layer stays the same: see ``ops.layer_roles``)
    and records each view it is handed."""

    config_class = _ProbeConfig
    aliases = ()
    seen: ClassVar[list[tuple[VisualView, torch.Tensor]]] = []

    def vision_layers(self, full_attention_layers: list[int], num_layers: int) -> list[int]:
        return list(range(num_layers))

    def select(self, view: VisualView, k: int):
        selection = super().select(view, k)
        _Probe.seen.append((view, selection.indices))
        return selection


@contextmanager
def _probe_registered() -> Iterator[type[_Probe]]:
    register_pruner(_Probe)
    _Probe.seen = []
    try:
        yield _Probe
    finally:
        _REGISTRY.pop(_ProbeConfig.name, None)


@torch.no_grad()
def capture_views(model: Any, processor: Any, family: str, items: list, batch_size: int = 50
                  ) -> list[tuple[VisualView, torch.Tensor]]:
    """One forward per batch with zero_tprune at keep ``KEEPS[0]``: the view it saw and the tokens it kept,
    one per item, in item order."""
    views: list[tuple[VisualView, torch.Tensor]] = []
    with _probe_registered() as probe, vtprune.apply(model, _ProbeConfig.name, keep=KEEPS[0]):
        for s in range(0, len(items), batch_size):
            batch = items[s:s + batch_size]
            probe.seen = []
            inputs = processor(text=[prompt(family, it.question.text) for it, _ in batch],
                               images=[image for _, image in batch], return_tensors="pt", padding=True)
            model(**inputs)
            views += sorted(probe.seen, key=lambda seen: seen[0].sample)
            if len(probe.seen) != len(batch):
                raise RuntimeError(f"expected {len(batch)} views, got {len(probe.seen)}")
    return views


# ---- metrics -------------------------------------------------------------------------------------------------
def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counted half; NaN without both."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos[:, None] - neg[None]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def kept_metrics(kept: torch.Tensor, priority: torch.Tensor) -> dict[str, float]:
    """Mean priority of the kept tokens and the share of object / target tokens kept."""
    mask = torch.zeros_like(priority, dtype=torch.bool)
    mask[kept] = True
    obj, tgt = priority >= 1, priority == 2
    return {"mean_priority": float(priority[kept].float().mean()),
            "object_recall": float((mask & obj).sum() / obj.sum()) if obj.any() else float("nan"),
            "target_recall": float((mask & tgt).sum() / tgt.sum()) if tgt.any() else float("nan")}


def i_stage(g: AttentionGraph, iters: int, tol: float, head_filter: bool, cls_init: bool) -> torch.Tensor:
    """zero_tprune's node scores (``wpr_node_scores``) with the start made uniform when ``cls_init`` is off."""
    init = pagerank_init(g.heads, g.nodes, g.has_cls and cls_init, g.query.device)
    scores = weighted_pagerank(g.query, g.key, g.scaling, init, iters, tol)
    heads = informative_heads(scores[:, int(g.has_cls):], HEAD_VARIANCE if head_filter else None)
    return rms_heads(scores, heads)


def per_head_tokens(g: AttentionGraph, node_scores: torch.Tensor, size: int) -> torch.Tensor:
    """[H, N] node scores -> [H, size] token scores (summed over each token's patches)."""
    return torch.stack([g.pool(s, size) for s in node_scores])


def rescaled_variance(scores: torch.Tensor) -> torch.Tensor:
    """The variance ``informative_heads`` bounds: per head, of the scores rescaled to mean 1. [H]."""
    return (scores / scores.mean(-1, keepdim=True)).var(-1, unbiased=False)


def concentration(view: VisualView, priority: torch.Tensor) -> dict[int, dict[str, list[float]]]:
    """(a) per captured layer: per-head concentration statistics of one image's graph (one view per image)."""
    out: dict[int, dict[str, list[float]]] = {}
    size = view.num_tokens
    obj_token = priority >= 1
    for layer, vqs in sorted(captured_layers(view).items()):
        g = graph_of(vqs[0])
        attn = attention_rows(g.query, g.key, g.scaling)  # [H, N, N]
        heads, n = attn.shape[:2]
        rec = attn.mean(1)  # [H, N], sums to 1 per head
        top = max(1, math.ceil(TOP_SHARE * n))
        patch = g.token >= 0
        node_obj = torch.zeros(n, dtype=torch.bool)
        node_obj[patch] = obj_token[g.token[patch]]
        node_bg = patch & ~node_obj
        top_nodes = rec.topk(top, -1).indices  # [H, top]
        tok = per_head_tokens(g, rec, size)
        stats = {
            "entropy": (-(rec * rec.clamp_min(1e-30).log()).sum(-1) / math.log(n)).tolist(),
            "top5_mass": rec.topk(top, -1).values.sum(-1).tolist(),
            "top1_mass": rec.max(-1).values.tolist(),
            "cls_mass": (rec[:, 0] if g.has_cls else torch.full((heads,), float("nan"))).tolist(),
            "top5_object_share": node_obj[top_nodes].float().mean(-1).tolist(),
            "object_patch_share": [float(node_obj[patch].float().mean())] * heads,
            "received_auc_objects": [auc(t, obj_token) for t in tok],
            "bg_vote_on_bg": (attn[:, node_bg][:, :, node_bg].sum(-1).mean(-1)
                              if node_bg.any() else torch.full((heads,), float("nan"))).tolist(),
            "bg_key_share": [float(node_bg.sum() / n)] * heads,
            "obj_vote_on_obj": (attn[:, node_obj][:, :, node_obj].sum(-1).mean(-1)
                                if node_obj.any() else torch.full((heads,), float("nan"))).tolist(),
            "obj_key_share": [float(node_obj.sum() / n)] * heads,
            "self_mass": attn.diagonal(dim1=-2, dim2=-1).mean(-1).tolist(),
        }
        out[layer] = stats
    return out


def score_variants(view: VisualView) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(b) [V] token scores per method at the read layer, and the [H, V] per-head 1-iteration PageRank scores."""
    graphs = reading_graphs(view)
    size = view.num_tokens
    has_cls = graphs[0].has_cls
    variants: dict[str, torch.Tensor] = {}
    starts = (("[CLS] init", True), ("uniform init", False)) if has_cls else (("uniform init", False),)
    for start, cls_init in starts:
        for iters_name, it in (("1 it", {"iters": 1, "tol": 0.0}), ("converged", CONVERGED)):
            for filt in (True, False):
                name = f"wpr {iters_name}, {'filter' if filt else 'no filter'}, {start}"
                variants[name] = pooled(graphs, size, lambda g, it=it, filt=filt, cls_init=cls_init:
                                        i_stage(g, it["iters"], it["tol"], filt, cls_init))
    if has_cls:
        variants["[CLS] attention (read layer)"] = pooled(
            graphs, size, lambda g: attention_rows(g.query[:, :1], g.key, g.scaling)[:, 0].mean(0))
    variants["vtc_cls (summed [CLS] attention)" if has_cls else "vtc_cls (received-attention fallback)"] = \
        summed_cls_attention(view)
    variants["received attention (head mean)"] = pooled(graphs, size, received_attention)
    variants["least received attention"] = -variants["received attention (head mean)"]
    g = graphs[0]
    init = pagerank_init(g.heads, g.nodes, g.has_cls, g.query.device)
    heads = per_head_tokens(g, weighted_pagerank(g.query, g.key, g.scaling, init, 1), size)
    return variants, heads


def analyse(view: VisualView, priority: torch.Tensor, seed: int) -> dict[str, Any]:
    """Every per-image number of (a)-(d)."""
    size = view.num_tokens
    obj, tgt = priority >= 1, priority == 2
    gen = torch.Generator().manual_seed(seed)
    variants, head_scores = score_variants(view)
    variants["random"] = torch.rand(size, generator=gen)
    variants["[ref] informed: question targets"] = priority.float() + torch.rand(size, generator=gen)
    head_auc = [auc(h, obj) for h in head_scores]
    best = int(np.nanargmax(head_auc)) if not all(math.isnan(a) for a in head_auc) else 0
    variants["best single head in hindsight (1 it)"] = head_scores[best]
    methods: dict[str, dict[str, float]] = {}
    for name, s in variants.items():
        row = {"auc_objects": auc(s, obj), "auc_targets": auc(s, tgt)}
        for keep in KEEPS:
            for key, val in kept_metrics(top_k(s, budget(keep, size)).indices, priority).items():
                row[f"{key}@{keep}"] = val
        methods[name] = row
    graphs = reading_graphs(view)
    fed = fed_tokens(graphs, size)
    similarity: dict[str, float] = {}
    full_variants = {"zero_tprune (I'->S->I, default)": (WPROptions(), 0.5),
                     "zero_tprune, no head filter": (WPROptions(head_variance=None), 0.5),
                     "zero_tprune, no S-stage": (WPROptions(), 0.0)}
    for name, (options, share) in full_variants.items():
        row = methods.setdefault(name, {"auc_objects": float("nan"), "auc_targets": float("nan")})
        for keep in KEEPS:
            k = budget(keep, size)
            kept = zero_tprune(graphs, size, k, options, share).indices
            row.update({f"{key}@{keep}": val for key, val in kept_metrics(kept, priority).items()})
            if share == 0.5 and options.head_variance is not None:  # (d) on the default method
                removed_s = similarity_stage(graphs, size, fed, math.floor(share * (size - k)), options)
                lost = torch.ones(size, dtype=torch.bool)
                lost[kept] = False
                for label, group in (("object", obj), ("target", tgt)):
                    similarity[f"s_removed_{label}_share@{keep}"] = (
                        float((removed_s & group).sum() / removed_s.sum()) if removed_s.any() else float("nan"))
                    similarity[f"s_share_of_lost_{label}s@{keep}"] = (
                        float((removed_s & group).sum() / (lost & group).sum()) if (lost & group).any()
                        else float("nan"))
                similarity[f"s_removed_count@{keep}"] = float(removed_s.sum())
                similarity[f"lost_count@{keep}"] = float(lost.sum())
    similarity["object_token_share"] = float(obj.float().mean())
    similarity["target_token_share"] = float(tgt.float().mean())
    # (c) head filter on every captured layer, 1 iteration from the method's start
    heads_out: dict[int, dict[str, Any]] = {}
    for layer, vqs in sorted(captured_layers(view).items()):
        g = graph_of(vqs[0])
        init = pagerank_init(g.heads, g.nodes, g.has_cls, g.query.device)
        scores = weighted_pagerank(g.query, g.key, g.scaling, init, 1)
        var = rescaled_variance(scores[:, int(g.has_cls):])
        inside = (var >= HEAD_VARIANCE[0]) & (var <= HEAD_VARIANCE[1])
        tok = per_head_tokens(g, scores, size)
        heads_out[layer] = {"variance": var.tolist(), "passes": inside.tolist(),
                            "auc_objects": [auc(t, obj) for t in tok]}
    return {"methods": methods, "similarity": similarity, "concentration": concentration(view, priority),
            "heads": heads_out}


# ---- aggregation ---------------------------------------------------------------------------------------------
def nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=float)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def aggregate(per_item: list[dict[str, Any]], head_variance: tuple[float, float]) -> dict[str, Any]:
    """Means over images (NaN-aware) of every number; per-head lists stay per head."""
    methods: dict[str, dict[str, float]] = {}
    for name in per_item[0]["methods"]:
        keys = per_item[0]["methods"][name]
        methods[name] = {k: nanmean([it["methods"][name][k] for it in per_item]) for k in keys}
    similarity = {k: nanmean([it["similarity"][k] for it in per_item]) for k in per_item[0]["similarity"]}
    concentration: dict[int, dict[str, list[float]]] = {}
    for layer in per_item[0]["concentration"]:
        stats = per_item[0]["concentration"][layer]
        concentration[layer] = {k: [nanmean([it["concentration"][layer][k][h] for it in per_item])
                                    for h in range(len(stats[k]))] for k in stats}
    heads: dict[int, dict[str, Any]] = {}
    for layer in per_item[0]["heads"]:
        var = np.array([it["heads"][layer]["variance"] for it in per_item])  # [items, H]
        passes = np.array([it["heads"][layer]["passes"] for it in per_item])
        aucs = np.array([it["heads"][layer]["auc_objects"] for it in per_item], dtype=float)
        n_pass = passes.sum(1)
        heads[layer] = {
            "variance_quantiles_per_head": {q: np.nanquantile(var, q / 100, axis=0).tolist() for q in (10, 50, 90)},
            "pass_rate_per_head": passes.mean(0).tolist(),
            "heads_passing_mean": float(n_pass.mean()),
            "heads_passing_histogram": {int(c): int((n_pass == c).sum()) for c in range(var.shape[1] + 1)},
            "none_pass_fallback_rate": float((n_pass == 0).mean()),
            "auc_objects_per_head": np.nanmean(aucs, 0).tolist(),
            "auc_objects_passing": float(np.nanmean(aucs[passes])) if passes.any() else float("nan"),
            "auc_objects_rejected": float(np.nanmean(aucs[~passes])) if (~passes).any() else float("nan"),
        }
    return {"methods": methods, "similarity": similarity, "concentration": concentration, "heads": heads,
            "head_variance_bounds": list(head_variance)}


def run_family(family: str, n: int, seed: int, checkpoint: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, processor = load_checkpoint(checkpoint or CHECKPOINTS / family)
    items = held_out(family, n, seed)
    captured = capture_views(model, processor, family, items)
    views = [view for view, _ in captured]
    t1 = time.perf_counter()
    per_item, same = [], 0
    for i, ((item, _), (view, kept)) in enumerate(zip(items, captured)):
        priority = torch.tensor(token_priorities(item, family)["question"])
        per_item.append(analyse(view, priority, seed * 100_003 + i))
        k = budget(KEEPS[0], view.num_tokens)  # the selection recomputed here is the one the pruner made
        same += torch.equal(zero_tprune(reading_graphs(view), view.num_tokens, k, WPROptions(), 0.5).indices, kept)
    graphs = reading_graphs(views[0])
    read_layer = next(layer for layer, vqs in captured_layers(views[0]).items()
                      if torch.equal(graph_of(vqs[0]).query, graphs[0].query))
    out = aggregate(per_item, HEAD_VARIANCE)
    out.update({"family": family, "n": len(items), "seed": seed, "read_layer": read_layer,
                "encoder_layers": sorted(captured_layers(views[0])), "attention_heads": graphs[0].heads,
                "nodes": graphs[0].nodes, "has_cls": graphs[0].has_cls, "visual_tokens": views[0].num_tokens,
                "selections_equal_to_the_pruner": f"{same}/{len(items)} at keep {KEEPS[0]}",
                "seconds": {"forward": round(t1 - t0, 2), "analysis": round(time.perf_counter() - t1, 2)}})
    return out


# ---- report -----------------------------------------------------------------------------------------------
def _rounded(x: Any) -> Any:
    """JSON-ready copy with floats to 4 decimals (NaN -> None) and string keys."""
    if isinstance(x, dict):
        return {str(k): _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 4)
    return x


def _f(x: float, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _heads(values: list[float], pct: bool = False) -> str:
    return " / ".join(_f(v, pct) for v in values)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Zero-TPrune diagnostic on the testbeds\n",
             f"Command: `{report['command']}`\n",
             "Per-image means over the held-out questions; per-head values are listed head 0 / 1 / ... ."]
    for fam in report["families"]:
        r = report["families"][fam]
        lines += [(f"\n## {fam} (n = {r['n']}, {r['nodes']} graph nodes{' incl. [CLS]' if r['has_cls'] else ''}, "
                  f"{r['visual_tokens']} visual tokens, read layer {r['read_layer']} of "
                  f"{len(r['encoder_layers'])}; the recomputed default selection equals the pruner's for "
                  f"{r['selections_equal_to_the_pruner']})\n"),
                  "### (b) scores vs object tokens at the read layer\n",
                  ("AUC: objects (priority >= 1) / targets (priority 2). At each keep: mean priority of the kept tokens, "
                  "% of object tokens kept, % of target tokens kept.\n"),
                  "| method | AUC obj | AUC tgt | " + " | ".join(
                      f"prio@{k} | obj kept@{k} | tgt kept@{k}" for k in KEEPS) + " |",
                  "|---|---|---|" + "---|---|---|" * len(KEEPS)]
        for name, m in r["methods"].items():
            cells = [_f(m["auc_objects"]), _f(m["auc_targets"])]
            for k in KEEPS:
                cells += [_f(m[f"mean_priority@{k}"]), _f(m[f"object_recall@{k}"], True),
                          _f(m[f"target_recall@{k}"], True)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["\n### (a) concentration of received attention, per layer (per head)\n",
                  ("| layer | entropy (1 = uniform) | top-5 % mass | top-1 mass | [CLS] mass | object share of top 5 % "
                  "(all patches) | received-attn AUC obj | bg queries -> bg keys (bg key share) | "
                  "obj queries -> obj keys (obj key share) |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for layer, c in r["concentration"].items():
            lines.append(
                f"| {layer}{' (read)' if int(layer) == r['read_layer'] else ''} | {_heads(c['entropy'])} | "
                f"{_heads(c['top5_mass'])} | {_heads(c['top1_mass'])} | {_heads(c['cls_mass'])} | "
                f"{_heads(c['top5_object_share'])} ({_f(c['object_patch_share'][0])}) | "
                f"{_heads(c['received_auc_objects'])} | {_heads(c['bg_vote_on_bg'])} ({_f(c['bg_key_share'][0])}) | "
                f"{_heads(c['obj_vote_on_obj'])} ({_f(c['obj_key_share'][0])}) |")
        lo, hi = r["head_variance_bounds"]
        lines += [f"\n### (c) head filter (bounds [{lo}, {hi}] on 1-iteration scores rescaled to mean 1)\n",
                  ("| layer | variance p10 / p50 / p90 per head | pass rate per head | heads passing (mean) | "
                  "none pass (all used) | object AUC per head | AUC passing / rejected |"),
                  "|---|---|---|---|---|---|---|"]
        for layer, h in r["heads"].items():
            q = h["variance_quantiles_per_head"]
            var = " ; ".join(f"{q[10][i]:.2f} / {q[50][i]:.2f} / {q[90][i]:.2f}" for i in range(len(q[50])))
            lines.append(f"| {layer}{' (read)' if int(layer) == r['read_layer'] else ''} | {var} | "
                         f"{_heads(h['pass_rate_per_head'], True)} | {h['heads_passing_mean']:.2f} | "
                         f"{_f(h['none_pass_fallback_rate'], True)} % | {_heads(h['auc_objects_per_head'])} | "
                         f"{_f(h['auc_objects_passing'])} / {_f(h['auc_objects_rejected'])} |")
        s = r["similarity"]
        lines += ["\n### (d) similarity stage (default zero_tprune)\n",
                  (f"Object tokens are {_f(s['object_token_share'], True)} % and target tokens "
                  f"{_f(s['target_token_share'], True)} % of all tokens.\n"),
                  ("| keep | S removes | of which objects % | of which targets % | total removed | "
                  "S's share of lost objects % | S's share of lost targets % |"),
                  "|---|---|---|---|---|---|---|"]
        for k in KEEPS:
            lines.append(f"| {k} | {s[f's_removed_count@{k}']:.1f} | {_f(s[f's_removed_object_share@{k}'], True)} | "
                         f"{_f(s[f's_removed_target_share@{k}'], True)} | {s[f'lost_count@{k}']:.1f} | "
                         f"{_f(s[f's_share_of_lost_objects@{k}'], True)} | {_f(s[f's_share_of_lost_targets@{k}'], True)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="held-out questions per testbed")
    parser.add_argument("--seed", type=int, default=0, help="which held-out questions (and the random baseline)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="folder with one checkpoint per family")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zero_tprune_diagnostic",
                        help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    families = [f for f in args.families.split(",") if f]
    command = ("OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python bench/zero_tprune_diagnostic.py "
               f"--n {args.n} --seed {args.seed} --families {','.join(families)}")
    report = {"command": command, "keeps": list(KEEPS), "torch": torch.__version__,
              "families": {f: run_family(f, args.n, args.seed, args.checkpoints / f) for f in families}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(_rounded(report), indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
