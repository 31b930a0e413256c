"""Qwen3.5 specifics: the hybrid decoder of Gated-DeltaNet linear-attention layers (a conv + recurrent state in the
cache, a 2-D padding mask) and gated full-attention layers (query + output gate, q/k norms, partial rotary), the
refused in-LLM layers, FLOPs as torch computes them, and the MoE variant through the same adapter.

The tiny model alternates linear (0, 2) and full (1, 3) layers. Every test has a negative control."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from conftest import GEN, batch_inputs, model
from test_core_reference import _capture, _uniform_keep
from transformers.cache_utils import DynamicCache

import vtprune
from vtprune import benchmark
from vtprune import flops as F
from vtprune.capture import InputCapture, rotate
from vtprune.errors import VTPruneError
from vtprune.models import adapter_for, family_class
from vtprune.models.qwen3_5 import Qwen3_5Adapter
from vtprune.testing import TinyVLM

FAMILY = "qwen3_5"


@functools.cache
def moe_model() -> TinyVLM:
    """The tiny Qwen3.5-MoE (4 experts, top 2, a shared expert), set up for generation like the dense one."""
    dense = model(FAMILY)
    torch.manual_seed(0)
    config, proc = Qwen3_5Adapter.tiny_parts(4, moe=True)
    m = Qwen3_5Adapter.model_class(config)(config).eval()
    m.generation_config = dense.model.generation_config
    for cfg in (m.config, m.config.text_config):
        cfg.bos_token_id = cfg.eos_token_id = None
        cfg.pad_token_id = dense.processor.tokenizer.pad_token_id
    return TinyVLM(model=m, processor=proc, family=FAMILY)


@functools.cache
def slow_decay_model() -> TinyVLM:
    """The tiny dense model with slowly decaying linear-attention states (A ≈ 0), so that what a recurrent state
    summarises shows in later logits (random weights otherwise forget the image within a few text tokens)."""
    tv = model(FAMILY)
    slow = copy.deepcopy(tv.model)
    for i in adapter_for(slow).recurrent_layers:
        slow.model.language_model.layers[i].linear_attn.A_log.data.fill_(-8.0)
    return TinyVLM(model=slow, processor=tv.processor, family=FAMILY)


def _logits(out) -> torch.Tensor:
    return torch.stack(out.logits, 1)


# ---- refusals ---------------------------------------------------------------------------------------
def test_in_llm_k_at_or_before_the_first_full_layer_is_refused():
    tv = model(FAMILY)
    with pytest.raises(VTPruneError, match="first full-attention layer"):
        vtprune.apply(tv.model, "random", keep=0.3, site="layer", layer=1)
    with pytest.raises(VTPruneError, match="linear-attention"):  # FastV reads layer K-1 = 2: linear
        vtprune.apply(tv.model, "fastv", keep=0.3, site="layer", layer=3)
    vtprune.apply(tv.model, "random", keep=0.3, site="layer", layer=3).remove()  # no attention read: fine
    vtprune.apply(tv.model, "fastv", keep=0.3, site="layer", layer=2).remove()


def test_negative_control_k1_breaks_without_the_refusal(monkeypatch):
    """Why K=1 is refused: the cache length transformers reads becomes the pruned one, so the decode masks no
    longer span the conversation that the in-LLM site gathers from."""
    tv = model(FAMILY)
    single, batch = batch_inputs(tv, [0]), batch_inputs(tv, [0, 1])
    monkeypatch.setattr(Qwen3_5Adapter, "check_site", lambda self, config, needs: None)
    with vtprune.apply(tv.model, "random", keep=0.3, site="layer", layer=1):
        cache = tv.model(**single, use_cache=True).past_key_values
        assert cache.get_seq_length() < single["input_ids"].shape[1]
        with pytest.raises((RuntimeError, IndexError)):  # a mask column gathered past the pruned length
            tv.model.generate(**batch, **GEN)


# ---- gated full attention: llm_qk ----------------------------------------------------------------------
def test_llm_qk_matches_the_gated_attention_module():
    """Recomputed q/k reproduce the eager module's attention weights (query half of q_proj, q/k norms, partial
    rotary); negative controls: the gate half as query, or no q_norm."""
    tv = model(FAMILY, "eager")
    inputs = batch_inputs(tv, [1])
    adapter = adapter_for(tv.model)
    attn = adapter.llm_attention(1)
    cap, weights = InputCapture(armed=True), []
    h1 = attn.register_forward_pre_hook(cap, with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, out: weights.append(out[1]))
    try:
        tv.model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    q, k, scaling = adapter.llm_qk(1, cap)
    assert q.shape[-1] == attn.head_dim and cap.tensor("position_embeddings", 1)[0].shape[-1] < attn.head_dim

    def probs(q: torch.Tensor) -> torch.Tensor:
        kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        s = (q @ kk.transpose(-1, -2)) * scaling
        n = s.shape[-1]
        return s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)

    torch.testing.assert_close(probs(q), weights[0], atol=1e-6, rtol=1e-5)
    hidden = cap.tensor("hidden_states")
    b, n, _ = hidden.shape
    gate = attn.q_proj(hidden).view(b, n, -1, 2 * attn.head_dim)[..., attn.head_dim:]
    cos, sin = cap.tensor("position_embeddings", 1)
    for wrong in (attn.q_norm(gate).transpose(1, 2), attn.q_proj(hidden).view(b, n, -1, 2 * attn.head_dim)
                  [..., :attn.head_dim].transpose(1, 2)):
        rot = cos.shape[-1]
        wrong = torch.cat([rotate(wrong[..., :rot], cos[:, None], sin[:, None]), wrong[..., rot:]], -1)
        assert (probs(wrong) - weights[0]).abs().max() > 1e-3


def test_fastv_at_a_linear_k_minus_1_has_no_attention_module():
    adapter = adapter_for(model(FAMILY).model)
    assert adapter.recurrent_layers == frozenset({0, 2})
    with pytest.raises(VTPruneError, match="linear-attention layer"):
        adapter.llm_attention(2)


# ---- in-LLM pruning across linear-attention layers: the layer-by-layer oracle ----------------------------
def _oracle(tv, inputs, keep: torch.Tensor, K: int, tokens: torch.Tensor, stale_linear_state=None):
    """Run the *unhooked* decoder layer by layer: layers < K on the whole prompt, layers >= K on the kept tokens
    only (linear layers from a zero state, full layers with causal masks), all writing one cache; then decode
    ``tokens`` one by one at their original positions. ``stale_linear_state``: a cache whose linear-layer states
    (from the whole prompt) replace the kept-token ones of layers >= K after the prefill (negative control)."""
    lm = tv.model.model.language_model
    _, lm_kw = _capture(lm, lambda: tv.model(**inputs))
    embeds, pos = lm_kw["inputs_embeds"], lm_kw["position_ids"][-3:]
    recurrent = adapter_for(tv.model).recurrent_layers
    cache = DynamicCache(config=lm.config)
    full_pe, kept_pe = lm.rotary_emb(embeds, pos), lm.rotary_emb(embeds, pos[..., keep])
    h = embeds
    for i, layer in enumerate(lm.layers):
        if i == K:
            h = h[:, keep]
        n = h.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        h = layer(h, attention_mask=None if i in recurrent else causal, position_embeddings=full_pe if i < K else
                  kept_pe, position_ids=None, past_key_values=cache, use_cache=True)
    if stale_linear_state is not None:
        for i in recurrent:
            if i >= K:
                cache.layers[i].conv_states[0] = stale_linear_state.layers[i].conv_states[0].clone()
                cache.layers[i].recurrent_states[0] = stale_linear_state.layers[i].recurrent_states[0].clone()
    logits = [tv.model.lm_head(lm.norm(h))[:, -1]]
    for step, tok in enumerate(tokens[:-1]):
        e = tv.model.model.get_input_embeddings()(tok.view(1, 1))
        pe = lm.rotary_emb(e, pos[..., -1:] + 1 + step)
        h = e
        for layer in lm.layers:
            h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=None, past_key_values=cache,
                      use_cache=True)
        logits.append(tv.model.lm_head(lm.norm(h))[:, -1])
    return torch.stack(logits, 1), cache


@pytest.mark.parametrize("K", [2, 3])
def test_in_llm_decode_equals_the_layerwise_oracle(K):
    """Pruned prefill + decode from the layered cache == the oracle; the linear layers' conv/recurrent states
    are the oracle's (kept tokens) at layers >= K and the unpruned model's below K. Negative controls: linear
    states left from the whole prompt, and the plain shortened input (pre-LLM), both differ."""
    tv = slow_decay_model()
    inputs = batch_inputs(tv, [1])
    keep = _uniform_keep(tv, inputs, 0.4)
    with vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=K):
        out = tv.model.generate(**inputs, **GEN)
        hooked = tv.model(**inputs, use_cache=True).past_key_values  # the cache after the prefill
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    reference, _ = _oracle(tv, inputs, keep, K, new)
    torch.testing.assert_close(_logits(out), reference, atol=1e-5, rtol=1e-5)
    _, cache = _oracle(tv, inputs, keep, K, new[:1])  # prefill only
    unpruned = tv.model(**inputs, use_cache=True).past_key_values
    for i in adapter_for(tv.model).recurrent_layers:
        for states in ("conv_states", "recurrent_states"):
            got, want = getattr(hooked.layers[i], states)[0], getattr(cache.layers[i], states)[0]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        # the recurrent state summarises the kept tokens from K on (the conv state holds the last 4 tokens' conv
        # inputs: text after the image, the same either way)
        full = unpruned.layers[i].recurrent_states[0]
        assert (i < K) == bool(torch.allclose(hooked.layers[i].recurrent_states[0], full, atol=1e-5)), i
    if any(i >= K for i in adapter_for(tv.model).recurrent_layers):
        stale, _ = _oracle(tv, inputs, keep, K, new, stale_linear_state=unpruned)
        assert (stale[:, 1:] - reference[:, 1:]).abs().max() > 1e-3
    with vtprune.apply(tv.model, "uniform", keep=0.4):
        shorter = _logits(tv.model.generate(**inputs, **GEN))
    assert (shorter - reference).abs().max() > 1e-3


def test_linear_layers_get_a_2d_mask_of_the_kept_tokens():
    """A ragged batch pruned at K=2: the linear layers >= K get [b, L_kept] masks (never 4-D), and each row
    equals that sample alone. Negative control: treating them as attention layers (4-D masks) fails."""
    tv = model(FAMILY)
    inputs = batch_inputs(tv, [0, 1])
    seen = []
    with vtprune.apply(tv.model, "uniform", keep=0.3, site="layer", layer=2) as handle:
        hook = tv.model.model.language_model.layers[2].register_forward_pre_hook(  # after vtprune's own hooks
            lambda m, a, k: seen.append(k.get("attention_mask")), with_kwargs=True)
        try:
            batch = tv.model.generate(**inputs, **GEN)
        finally:
            hook.remove()
        kept = handle.stats.samples
        singles = [tv.model.generate(**batch_inputs(tv, [i]), **GEN) for i in (0, 1)]
    prefill = seen[0]
    assert prefill.dim() == 2 and prefill.shape[1] == max(s.layer_seq_lens[2] for s in kept)
    assert prefill.sum(1).tolist() == [s.layer_seq_lens[2] for s in kept]
    assert len(seen) == GEN["max_new_tokens"] and all(m is None for m in seen[1:])  # decode: one real token
    for row, single in enumerate(singles):
        torch.testing.assert_close(_logits(batch)[row], _logits(single)[0], atol=1e-5, rtol=1e-5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Qwen3_5Adapter, "recurrent_layers", property(lambda self: frozenset()))
        with vtprune.apply(tv.model, "uniform", keep=0.3, site="layer", layer=2), pytest.raises(RuntimeError):
            tv.model.generate(**inputs, **GEN)


# ---- FLOPs --------------------------------------------------------------------------------------------
def _per_layer(counter, n_layers: int) -> list[int]:
    counts = counter.get_flop_counts()
    out = []
    for i in range(n_layers):
        key = next(k for k in counts if k.endswith(f"language_model.layers.{i}"))
        out.append(sum(counts[key].values()))
    return out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_layer_flops_equal_flop_counter_for_prefill_continuation_and_decode(moe):
    """Each decoder layer's count (gated full attention; linear attention's conv1d and chunked delta-rule matmuls;
    routed experts) == FlopCounterMode on that layer, for a prefill, a multi-token continuation and a decode step.
    Negative control: the LLaMA formula of a plain decoder does not fit these layers."""
    tv = moe_model() if moe else model(FAMILY)
    cfg = tv.model.config
    inputs = batch_inputs(tv, [1])
    n = inputs["input_ids"].shape[1]
    cost = F.layer_cost(tv.model)
    layers = cfg.text_config.num_hidden_layers
    with torch.no_grad():
        counter = F.flop_counter()
        with counter:
            cache = tv.model(**inputs, use_cache=True).past_key_values
        assert _per_layer(counter, layers) == [sum(cost(i, n, n)) for i in range(layers)]
        ids = torch.tensor([[7, 8, 9, 10, 11]])
        pos = torch.arange(n, n + 6).view(1, 1, -1).expand(4, 1, -1)  # text tokens: one value on every row
        counter = F.flop_counter()
        with counter:
            tv.model(input_ids=ids, attention_mask=torch.ones(1, n + 5, dtype=torch.long), position_ids=pos[..., :5],
                     past_key_values=cache, use_cache=True)
        assert _per_layer(counter, layers) == [sum(cost(i, 5, n + 5)) for i in range(layers)]
        counter = F.flop_counter()
        with counter:
            tv.model(input_ids=ids[:, :1], attention_mask=torch.ones(1, n + 6, dtype=torch.long),
                     position_ids=pos[..., 5:], past_key_values=cache, use_cache=True)
        assert _per_layer(counter, layers) == [sum(cost(i, 1, n + 6)) for i in range(layers)]
    plain = F.LLMDims.from_config(cfg)
    assert sum(cost(0, n, n)) != plain.linear_per_token() * n + plain.attention(n, n)


@pytest.mark.parametrize("case", [None, {"site": "pre_llm"}, {"site": "layer", "layer": 2}],
                         ids=["unpruned", "pre_llm", "layer2"])
def test_moe_total_flops_equal_flop_counter(case):
    """The MoE variant end to end (vision included), pruned and unpruned, prefill + decode steps."""
    tv = moe_model()
    inputs = batch_inputs(tv, [0])

    def run():
        return tv.model.generate(**inputs, max_new_tokens=3, do_sample=False)

    if case is None:
        measured = F.measured_flops(run)
        report = F.flops_unpruned(tv.model, inputs, decode_steps=2)
    else:
        with vtprune.apply(tv.model, "random", keep=0.5, **case) as handle:
            measured = F.measured_flops(run)
            report = F.flops_from_stats(tv.model, handle.stats, inputs=inputs)
    assert report.total == measured


# ---- the MoE variant through the same adapter ------------------------------------------------------------
@pytest.mark.parametrize("site", [{"site": "pre_llm"}, {"site": "layer", "layer": 2}], ids=["pre_llm", "layer"])
def test_moe_keep_all_identity_and_cached_equals_uncached(site):
    tv = moe_model()
    assert isinstance(adapter_for(tv.model), Qwen3_5Adapter)
    inputs = batch_inputs(tv, [0, 1])
    ref = tv.model.generate(**inputs, **GEN)
    with vtprune.apply(tv.model, "random", keep=1.0, **site):
        same = tv.model.generate(**inputs, **GEN)
    assert torch.equal(same.sequences, ref.sequences) and torch.equal(_logits(same), _logits(ref))
    with vtprune.apply(tv.model, "random", keep=0.3, **site):
        cached = tv.model.generate(**inputs, **GEN)
        uncached = tv.model.generate(**inputs, **GEN, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(_logits(cached), _logits(uncached), atol=1e-5, rtol=1e-5)
    assert (_logits(cached) - _logits(ref)).abs().max() > 1e-3  # negative control: pruning changed something


def test_moe_in_llm_matches_the_layerwise_oracle():
    tv = moe_model()
    inputs = batch_inputs(tv, [1])
    keep = _uniform_keep(tv, inputs, 0.4)
    with vtprune.apply(tv.model, "uniform", keep=0.4, site="layer", layer=2):
        out = tv.model.generate(**inputs, **GEN)
    reference, _ = _oracle(tv, inputs, keep, 2, out.sequences[0, inputs["input_ids"].shape[1]:])
    torch.testing.assert_close(_logits(out), reference, atol=1e-5, rtol=1e-5)


# ---- loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_from_pretrained_local_folder_prunes(tmp_path, moe):
    tv = moe_model() if moe else model(FAMILY)
    tv.model.save_pretrained(tmp_path)
    loaded = benchmark.build_model(str(tmp_path))
    assert type(loaded) is type(tv.model) and family_class(loaded.config.model_type) is Qwen3_5Adapter
    inputs = batch_inputs(tv, [0])
    with vtprune.apply(tv.model, "uniform", keep=0.3, site="layer", layer=2):
        want = tv.model(**inputs).logits
    with vtprune.apply(loaded, "uniform", keep=0.3, site="layer", layer=2):
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_shipped_config_is_the_9b_layout():
    cfg = benchmark.load_config(benchmark.resolve_model("qwen3.5-9b"))
    text = cfg.text_config
    assert text.layer_types[3::4] == ["full_attention"] * 8 and text.layer_types.count("linear_attention") == 24
    assert cfg.vision_config.out_hidden_size == text.hidden_size == 4096
    inputs = benchmark.synthetic_inputs(cfg)
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == 576  # 768 x 768 px, 16-px patches merged 2x2


# ---- lmms-eval ----------------------------------------------------------------------------------------
def test_lmms_eval_cli_runs_the_pruned_qwen3_5_wrapper(tmp_path):
    """The stock lmms-eval CLI (a sweep on the lmms_eval backend) runs ``vtprune_qwen3_5``: lmms-eval's Qwen3.5
    wrapper (which resizes images for 16-px patches) with the pruner installed; the unpruned cell keeps all."""
    pytest.importorskip("lmms_eval")
    from lmms_sweep import lmms_sweep

    (base, _), (pruned, _) = cells = lmms_sweep(tmp_path, FAMILY, keep=4)
    for (record, result), after in zip(cells, (None, 4)):
        assert record["status"] == "ok", record.get("error")
        assert result["config"]["model"] == "vtprune_qwen3_5"
        before = result["throughput"]["avg_vtprune_visual_before"]
        assert before > 4 and result["throughput"]["avg_vtprune_visual_after"] == (after or before)
    assert base["method"] == "unpruned"
    assert pruned["lmms_eval"]["command"].startswith("lmms-eval --model vtprune_qwen3_5 --model_args pretrained=")
