"""ZOO-Prune's selection overhead at LLaVA-1.5-7B proportions, measurable on a CPU.

A full 7B prefill is too slow to repeat on a CPU, so the denominator is one real-size decoder layer
(LLaMA, hidden 4096, FFN 11008, 32 heads) timed on a 641-token prefill and multiplied by its 32 layers;
the numerator is ``zoo``'s ``select`` on 576 tokens with the real-size projector (1024 -> 4096 -> 4096,
GELU), full-rank and with ``rank=128``. Random weights, float32, SDPA, 1 thread, medians.

``--dtype bfloat16`` builds both in bf16 (a bf16 model: the prefill runs in bf16) and times ``zoo`` with
``precision="model"`` (its last-layer product in bf16, the default) and ``precision="float32"`` (what it ran before).

    python bench/zoo_overhead_7b.py --repeats 3 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vtprune.benchmark import load_config, resolve_model
from vtprune.capture import MLPProjector, ProjectorInput
from vtprune.measure import median
from vtprune.methods.zoo import ZooConfig, ZooPruner
from vtprune.view import ImageLayout, VisualView, budget

SEQ, VISUAL = 641, 576


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return median(samples)


def llm_prefill_seconds(config, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """One decoder layer on a SEQ-token prefill, times the number of layers."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    text = config.text_config
    text._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(text, layer_idx=0).eval().to(dtype)
    rotary = LlamaRotaryEmbedding(text)
    hidden = torch.randn(1, SEQ, text.hidden_size, dtype=dtype)
    pe = rotary(hidden, torch.arange(SEQ)[None])
    with torch.no_grad():
        one = timed(lambda: layer(hidden, attention_mask=None, position_embeddings=pe), repeats)
    return one * text.num_hidden_layers


def zoo_select_seconds(config, rank: int | None, repeats: int, dtype: torch.dtype = torch.float32,
                       precision: str = "model") -> float:
    """``zoo`` selection at keep 0.25 on VISUAL tokens through the real-size projector."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    proj = LlavaMultiModalProjector(config).eval().to(dtype)
    x = torch.randn(VISUAL, 1, config.vision_config.hidden_size, dtype=dtype)
    with torch.no_grad():
        features = proj(x[:, 0])
    pi = ProjectorInput(inputs=x, valid=torch.ones(VISUAL, dtype=torch.bool), project=lambda t: proj(t[:, 0]),
                        mlp=MLPProjector(first=proj.linear_1, act=proj.act, last=proj.linear_2))
    view = VisualView(features=features, text=features[:1], layout=ImageLayout.flat(VISUAL), site="pre_llm",
                      layer=None, sample=0, image=0, extras={"projector": pi})
    pruner = ZooPruner(ZooConfig(keep=0.25, rank=rank, precision=precision))
    return timed(lambda: pruner.select(view, budget(0.25, VISUAL)), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    config = load_config(resolve_model("llava-1.5-7b"))
    prefill = llm_prefill_seconds(config, args.repeats, dtype)
    rows = {"dtype": args.dtype, "llm_prefill_s": prefill}
    print(f"LLaVA-1.5-7B LLM prefill ({SEQ} tokens, 32 x one measured layer, {args.dtype}): {prefill:.1f} s",
          flush=True)
    variants = [(None, "model"), (128, "model")] + [(None, "float32")] * (dtype != torch.float32)
    for rank, precision in variants:
        s = zoo_select_seconds(config, rank, args.repeats, dtype, precision)
        name = f"zoo rank={rank}" + (f" precision={precision}" if dtype != torch.float32 else "")
        rows[name] = s
        print(f"{name}: {s * 1e3:.0f} ms = {100 * s / prefill:.2f} % of the LLM prefill", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
