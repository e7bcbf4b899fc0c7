"""Analytic cache memory, prefill FLOPs and decode traffic of any HybridConfig, without torch.

Cache bytes follow the layout of ``hybridlm.cache.HybridCache`` exactly (its docstring lists every
tensor), so ``cache_bytes(cfg, B, L, kv_dtype=...).total_bytes == model.new_cache(B, L).nbytes()``.
Bytes are split into what the model needs (``kv_bytes``: every per-token cache; ``state_bytes``:
recurrent states and conv windows) and the cache's own bookkeeping (key positions), because the
first two are what a serving system pays for and the last is an implementation detail.

Each layer's cost at context ``n`` is ``fixed + per_token * min(n, cap)`` (cap = the sliding
window for W layers): that one shape is enough for totals, crossover and plots, and is what
``web/calculator.js`` mirrors line for line.

Example::

    from hybridlm.config import HybridConfig
    from hybridlm.memory import cache_bytes, attention_twin, crossover_context
    cfg = HybridConfig.preset("qwen3-next-80b-a3b")
    cache_bytes(cfg, batch=1, context=262144).total_bytes
    crossover_context(cfg, attention_twin(cfg))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from hybridlm.config import ATTENTION_LETTERS, DTYPES, LINEAR_LETTERS, HybridConfig

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
POSITION_BYTES = 4  # the cache's key positions are int32
MAX_CONTEXT = 2**34  # search bound for crossovers; far past any real context
PRESETS_JS = Path(__file__).parent / "web" / "presets.js"


def _dtype_bytes(name: str, arg: str) -> int:
    if name not in DTYPE_BYTES:
        raise ValueError(f"{arg}: expected one of {DTYPES}, got {name!r}")
    return DTYPE_BYTES[name]


def _check_config(cfg: HybridConfig, name: str = "cfg") -> None:
    if not isinstance(cfg, HybridConfig):
        raise TypeError(f"{name}: expected a HybridConfig, got {type(cfg).__name__}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


# ------------------------------------------------------------------------------ cache bytes
@dataclass(frozen=True)
class LayerCost:
    """Bytes one layer caches per sequence at context n: state + conv + per_token * min(n, cap)."""

    letter: str
    state: int = 0  # recurrent state
    conv: int = 0  # short-conv window
    per_token: int = 0  # K/V, latent, index keys
    cap: int | None = None  # W layers keep at most this many tokens

    def kv_at(self, n: int) -> int:
        return self.per_token * (n if self.cap is None else min(n, self.cap))


def conv_channels(cfg: HybridConfig, letter: str) -> int:
    """Channels through the short conv: q, k and v of G, D and K layers; L and X have none."""
    if letter not in "GDK" or cfg.linear_conv_kernel_dim == 0:
        return 0
    return (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
            + cfg.linear_num_value_heads * cfg.linear_value_head_dim)


def _attention_per_token(cfg: HybridConfig, letter: str, kvb: int) -> int:
    gqa = 2 * cfg.num_key_value_heads * cfg.head_dim * kvb  # K and V
    mla = (cfg.mla_kv_lora_rank + cfg.mla_qk_rope_head_dim) * kvb  # latent + shared rotary key
    if letter in "AW":
        return gqa
    if letter == "M":
        return mla
    index_key = int(cfg.index_key_bytes) if cfg.index_key_bytes else cfg.index_head_dim * kvb
    return (mla if cfg.sparse_base == "mla" else gqa) + index_key


def layer_cost(cfg: HybridConfig, letter: str, kv_dtype: str = "bfloat16",
               state_dtype: str | None = None) -> LayerCost:
    """Per-sequence cache bytes of one layer of type ``letter``.

    kv_dtype: the cache dtype of K/V, latents and conv windows (the model's activation dtype);
    state_dtype: the recurrent state's (default ``cfg.state_dtype``).
    """
    kvb = _dtype_bytes(kv_dtype, "kv_dtype")
    sb = _dtype_bytes(state_dtype or cfg.state_dtype, "state_dtype")
    if letter in ATTENTION_LETTERS:
        cap = cfg.sliding_window if letter == "W" else None
        return LayerCost(letter, per_token=_attention_per_token(cfg, letter, kvb), cap=cap)
    if letter not in LINEAR_LETTERS:
        raise ValueError(f"letter: expected one of {sorted(ATTENTION_LETTERS | LINEAR_LETTERS)}, got {letter!r}")
    value_dim = cfg.linear_value_head_dim + (1 if letter == "X" and cfg.linear_normalize else 0)
    state = cfg.linear_num_value_heads * cfg.linear_key_head_dim * value_dim * sb
    conv = conv_channels(cfg, letter) * max(cfg.linear_conv_kernel_dim - 1, 0) * kvb
    return LayerCost(letter, state=state, conv=conv)


def bookkeeping_costs(cfg: HybridConfig) -> list[LayerCost]:
    """The cache's int32 positions: [B, L] shared by full-history attention layers, [B, min(L, W)]
    shared by W layers, and the next rotary position [B]."""
    letters = set(cfg.layer_types)
    costs = [LayerCost("next position", state=POSITION_BYTES)]
    if letters & set("AMS"):
        costs.append(LayerCost("positions", per_token=POSITION_BYTES))
    if "W" in letters:
        costs.append(LayerCost("window positions", per_token=POSITION_BYTES, cap=cfg.sliding_window))
    return costs


@dataclass(frozen=True)
class CacheBytes:
    """Cache bytes at one batch and context. total_bytes = kv + state + bookkeeping."""

    kv_bytes: int
    state_bytes: int  # recurrent state + conv window
    bookkeeping_bytes: int
    by_type: dict[str, int]  # layer letter -> bytes (all layers of that type)

    @property
    def model_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes

    @property
    def total_bytes(self) -> int:
        return self.kv_bytes + self.state_bytes + self.bookkeeping_bytes


def cache_bytes(cfg: HybridConfig, batch: int, context: int, kv_dtype: str = "bfloat16",
                state_dtype: str | None = None) -> CacheBytes:
    """Bytes of a cache for ``batch`` sequences of ``context`` tokens (ints > 0)."""
    _check_config(cfg)
    _check_positive("batch", batch)
    _check_positive("context", context)
    kv = state = 0
    by_type: dict[str, int] = {}
    for letter in cfg.layer_types:
        c = layer_cost(cfg, letter, kv_dtype, state_dtype)
        kv += batch * c.kv_at(context)
        state += batch * (c.state + c.conv)
        by_type[letter] = by_type.get(letter, 0) + batch * (c.kv_at(context) + c.state + c.conv)
    book = sum(batch * (c.state + c.kv_at(context)) for c in bookkeeping_costs(cfg))
    return CacheBytes(kv, state, book, by_type)


def _total(cfg: HybridConfig, n: int, kv_dtype: str, state_dtype: str | None) -> int:
    return cache_bytes(cfg, 1, n, kv_dtype, state_dtype).total_bytes


# ------------------------------------------------------------------------------ baselines
def attention_letter(cfg: HybridConfig) -> str:
    """The model's main full-attention type: the most common of A, M, S in its layers (A if none)."""
    counts = {c: cfg.layer_types.count(c) for c in "AMS"}
    best = max(counts, key=lambda c: counts[c])
    return best if counts[best] else "A"


def attention_twin(cfg: HybridConfig) -> HybridConfig:
    """The same layers with every linear layer turned into the model's softmax attention.

    Attention dimensions are the model's own, so the twin answers "what would this model cache
    without its linear layers?". W layers stay windowed: they are softmax attention already.
    """
    _check_config(cfg)
    letter = attention_letter(cfg)
    pattern = "".join(letter if c in LINEAR_LETTERS else c for c in cfg.layer_types)
    return dataclasses.replace(cfg, layer_pattern=pattern, num_layers=len(pattern))


def crossover_context(cfg: HybridConfig, baseline: HybridConfig, kv_dtype: str = "bfloat16",
                      state_dtype: str | None = None) -> int | None:
    """Smallest context from which ``cfg``'s cache stays below ``baseline``'s (batch-independent).

    None when it never does up to 2**34 tokens. Both caches are piecewise affine in the context
    with breaks at sliding windows, so "stays below" only needs checking at n, at each window
    beyond n, and at the bound; that makes the predicate monotone and a binary search exact.
    """
    _check_config(cfg)
    _check_config(baseline, "baseline")
    breaks = sorted({c.cap for m in (cfg, baseline) for c in
                     [layer_cost(m, x, kv_dtype, state_dtype) for x in set(m.layer_types)]
                     + bookkeeping_costs(m) if c.cap})

    def below_from(n: int) -> bool:
        return all(_total(cfg, m, kv_dtype, state_dtype) < _total(baseline, m, kv_dtype, state_dtype)
                   for m in [n] + [b for b in breaks if b > n] + [MAX_CONTEXT])

    if not below_from(MAX_CONTEXT):
        return None
    lo, hi = 1, MAX_CONTEXT  # invariant: below_from(hi)
    if below_from(lo):
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if below_from(mid) else (mid, hi)
    return hi


def reduction(cfg: HybridConfig, baseline: HybridConfig, batch: int, context: int,
              kv_dtype: str = "bfloat16", state_dtype: str | None = None) -> float:
    """1 - cfg's cache / baseline's cache (0.75 = a quarter of the memory)."""
    ours = cache_bytes(cfg, batch, context, kv_dtype, state_dtype).total_bytes
    theirs = cache_bytes(baseline, batch, context, kv_dtype, state_dtype).total_bytes
    return 1.0 - ours / theirs


# ------------------------------------------------------------------------------ parameters
def projection_params(cfg: HybridConfig, letter: str) -> int:
    """Weights of one layer's token mixer (projections, conv, indexer), norms left out."""
    h = cfg.hidden_size
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gqa = h * hq * d * (2 if cfg.attn_output_gate else 1) + 2 * h * hkv * d + hq * d * h
    qk_dim = cfg.mla_qk_nope_head_dim + cfg.mla_qk_rope_head_dim
    q_in = cfg.mla_q_lora_rank or h
    mla = ((h * cfg.mla_q_lora_rank if cfg.mla_q_lora_rank else 0) + q_in * hq * qk_dim
           + h * (cfg.mla_kv_lora_rank + cfg.mla_qk_rope_head_dim)
           + cfg.mla_kv_lora_rank * hq * (cfg.mla_qk_nope_head_dim + cfg.mla_v_head_dim)
           + hq * cfg.mla_v_head_dim * h)
    if letter in "AW":
        return gqa
    if letter == "M":
        return mla
    if letter == "S":
        ih, idim = cfg.index_num_heads, cfg.index_head_dim
        index_q_in = cfg.mla_q_lora_rank if cfg.sparse_base == "mla" and cfg.mla_q_lora_rank else h
        head_weights = h * ih if cfg.sparse_base == "mla" else 0  # DeepSeek's indexer weighs its heads; M3's does not
        indexer = index_q_in * ih * idim + h * idim + head_weights  # queries, one key, head weights
        return (mla if cfg.sparse_base == "mla" else gqa) + indexer
    lh, lv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    qk, vv = lh * cfg.linear_key_head_dim, lv * cfg.linear_value_head_dim
    qkv_out = h * (2 * qk + vv) + vv * h
    conv = conv_channels(cfg, letter) * cfg.linear_conv_kernel_dim
    if letter in "GD":  # + output gate z, write strength b and (G only) decay a per value head
        return qkv_out + h * vv + (2 if letter == "G" else 1) * h * lv + conv
    if letter == "K":  # + low-rank output gate (rank V), low-rank per-channel decay (rank K), beta
        k, v = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        return qkv_out + h * v + v * vv + h * k + k * lv * k + h * lv + conv
    if letter == "L":  # + output gate
        return qkv_out + h * vv
    return qkv_out  # X


def mlp_params(cfg: HybridConfig, layer: int) -> tuple[int, int]:
    """(total, active per token) weights of one layer's MLP or MoE (SwiGLU: 3 matrices)."""
    h = cfg.hidden_size
    if not cfg.layer_uses_moe(layer):
        return 3 * h * cfg.intermediate_size, 3 * h * cfg.intermediate_size
    expert = 3 * h * cfg.moe_intermediate_size
    shared = 3 * h * cfg.shared_expert_intermediate_size
    if cfg.shared_expert_intermediate_size and cfg.shared_expert_gate:
        shared += h  # Qwen's sigmoid gate on the shared expert
    fixed = shared + h * cfg.num_experts  # shared + router
    return fixed + cfg.num_experts * expert, fixed + cfg.num_experts_per_tok * expert


def param_counts(cfg: HybridConfig) -> tuple[int, int]:
    """(total, active per token) parameters of the model, norms left out."""
    embed = cfg.vocab_size * cfg.hidden_size
    total = active = embed * (1 if cfg.tie_word_embeddings else 2)
    for i, letter in enumerate(cfg.layer_types):
        mlp_total, mlp_active = mlp_params(cfg, i)
        total += projection_params(cfg, letter) + mlp_total
        active += projection_params(cfg, letter) + mlp_active
    return total, active


# ------------------------------------------------------------------------------ prefill FLOPs
def _pairs(n: int, cap: int | None = None) -> int:
    """Causal (query, key) pairs of n tokens when each query sees at most ``cap`` keys."""
    if cap is None or n <= cap:
        return n * (n + 1) // 2
    return cap * (cap + 1) // 2 + (n - cap) * cap


def mixer_flops(cfg: HybridConfig, letter: str, n: int) -> tuple[int, int]:
    """(quadratic, linear-in-n) FLOPs of one layer's token mixing over n prompt tokens.

    Softmax: 2 FLOPs per multiply-add over every causal (query, key) pair, for scores and values.
    Linear layers: the chunked form's 6 n K V + 3 n C K + n C^2 per value head (chunk C).
    Sparse layers: the indexer scores every pair (quadratic); attention sees top-k tokens.
    """
    hq, d = cfg.num_attention_heads, cfg.head_dim
    mla_pair = 2 * hq * (cfg.mla_qk_nope_head_dim + cfg.mla_qk_rope_head_dim + cfg.mla_v_head_dim)
    if letter == "A":
        return 4 * hq * d * _pairs(n), 0
    if letter == "W":
        return 0, 4 * hq * d * _pairs(n, cfg.sliding_window)
    if letter == "M":
        return mla_pair * _pairs(n), 0
    if letter == "S":
        block = cfg.sparse_block_size
        kept = (cfg.index_topk + cfg.sparse_local_blocks) * block
        pair = mla_pair if cfg.sparse_base == "mla" else 4 * hq * d
        indexer = 2 * cfg.index_num_heads * cfg.index_head_dim * _pairs(n)
        return indexer, pair * _pairs(n, kept)
    k, c = cfg.linear_key_head_dim, cfg.chunk_size
    v = cfg.linear_value_head_dim + (1 if letter == "X" and cfg.linear_normalize else 0)
    return 0, cfg.linear_num_value_heads * n * (6 * k * v + 3 * c * k + c * c)


def prefill_flops(cfg: HybridConfig, n: int) -> dict[str, int]:
    """Forward FLOPs of one prompt of n tokens, by part.

    Keys: ``quadratic`` (the n^2 term: softmax scores and values, sparse indexers),
    ``mixing_linear`` (linear-layer recurrences, windowed and top-k attention), ``projections``
    (token-mixer weights), ``mlp`` (active MLP/MoE weights), ``head`` (LM head of the last token),
    ``total``; and ``quadratic_<letter>`` per layer type that has one.
    """
    _check_config(cfg)
    _check_positive("context", n)
    out = {"quadratic": 0, "mixing_linear": 0, "projections": 0, "mlp": 0}
    for i, letter in enumerate(cfg.layer_types):
        quad, lin = mixer_flops(cfg, letter, n)
        out["quadratic"] += quad
        if quad:
            out[f"quadratic_{letter}"] = out.get(f"quadratic_{letter}", 0) + quad
        out["mixing_linear"] += lin
        out["projections"] += 2 * n * projection_params(cfg, letter)
        out["mlp"] += 2 * n * mlp_params(cfg, i)[1]
    out["head"] = 2 * cfg.hidden_size * cfg.vocab_size
    out["total"] = sum(out[k] for k in ("quadratic", "mixing_linear", "projections", "mlp", "head"))
    return out


# ------------------------------------------------------------------------------ decode traffic
def decode_bytes_per_token(cfg: HybridConfig, context: int, batch: int = 1,
                           kv_dtype: str = "bfloat16", weight_dtype: str = "bfloat16",
                           state_dtype: str | None = None) -> dict[str, float]:
    """Bytes a decode step moves through memory per decoded token, ``batch`` sequences at ``context``.

    Weights: read once per step and shared by the batch; an untied input embedding is not read
    whole but one row per token. An MoE layer's routed experts count as the number of distinct
    experts the batch's tokens reach, expected under uniform independent routing:
    E (1 - (1 - k/E)^batch) (k at batch 1; nearly all E once batch >> E/k; see ``experts_touched``). KV: every cached token a layer attends to (top-k tokens plus every index key for
    sparse layers). State: the recurrent state and conv window, read and written back (twice).
    """
    _check_config(cfg)
    _check_positive("context", context)
    _check_positive("batch", batch)
    wb = _dtype_bytes(weight_dtype, "weight_dtype")
    kvb = _dtype_bytes(kv_dtype, "kv_dtype")
    kv = state = 0
    for letter in cfg.layer_types:
        c = layer_cost(cfg, letter, kv_dtype, state_dtype)
        state += 2 * (c.state + c.conv)  # read, then written back
        if letter == "S":
            index_key = int(cfg.index_key_bytes) if cfg.index_key_bytes else cfg.index_head_dim * kvb
            kept = (cfg.index_topk + cfg.sparse_local_blocks) * cfg.sparse_block_size
            kv += index_key * context + (c.per_token - index_key) * min(context, kept)
        else:
            kv += c.kv_at(context)
    row = cfg.hidden_size * wb
    table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * row  # a tied table is read whole by the LM head
    extra_experts = experts_touched(cfg, batch) - cfg.num_experts_per_tok if cfg.num_experts else 0.0
    moe_layers = sum(cfg.layer_uses_moe(i) for i in range(cfg.num_layers)) if cfg.num_experts else 0
    shared = param_counts(cfg)[1] + moe_layers * extra_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    weights = (shared * wb - table) / batch + row
    return {"weights": weights, "kv": kv, "state": state, "total": weights + kv + state}


def experts_touched(cfg: HybridConfig, batch: int) -> float:
    """Expected distinct routed experts one MoE layer reads for ``batch`` tokens, each routed to k of E
    experts uniformly and independently: E (1 - (1 - k/E)^batch). 0 without experts."""
    _check_positive("batch", batch)
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    if not E:
        return 0.0
    return E * (1.0 - (1.0 - k / E) ** batch)


def n2_tax(cfg: HybridConfig, context: int, cap: int = 32768, batch: int = 1,
           kv_dtype: str = "bfloat16", state_dtype: str | None = None) -> dict[str, float]:
    """What the tokens past ``cap`` cost at ``context``: the deck's "are we still paying the n^2 tax
    beyond 32k, and what would a context cap save?".

    Returns ``quadratic_share`` (share of the extra prefill FLOPs that is the n^2 term),
    ``flops_saved`` (share of prefill FLOPs a cap would save), ``cache_bytes_saved`` (bytes of cache
    for ``batch`` sequences) and ``cache_saved`` (its share of the cache).
    """
    _check_positive("cap", cap)
    full, capped = prefill_flops(cfg, context), prefill_flops(cfg, min(cap, context))
    extra = full["total"] - capped["total"]
    c_full = cache_bytes(cfg, batch, context, kv_dtype, state_dtype).total_bytes
    c_cap = cache_bytes(cfg, batch, min(cap, context), kv_dtype, state_dtype).total_bytes
    return {
        "quadratic_share": (full["quadratic"] - capped["quadratic"]) / extra if extra else 0.0,
        "flops_saved": extra / full["total"],
        "cache_bytes_saved": c_full - c_cap,
        "cache_saved": (c_full - c_cap) / c_full,
    }


def n2_tax_line(cfg: HybridConfig, context: int, cap: int = 32768, batch: int = 1,
                kv_dtype: str = "bfloat16", state_dtype: str | None = None) -> str:
    """One sentence answering the n^2-tax question for ``cfg`` at ``context``."""
    if context <= cap:
        return f"n^2 tax: context {context:,} is within the {cap:,} cap; nothing to save."
    t = n2_tax(cfg, context, cap, batch, kv_dtype, state_dtype)
    twin = n2_tax(attention_twin(cfg), context, cap, batch, kv_dtype, state_dtype)
    verdict = "yes" if t["quadratic_share"] >= 0.5 else ("partly" if t["quadratic_share"] >= 0.2 else "barely")
    return (f"n^2 tax beyond {cap:,}: {verdict} - the n^2 term is {t['quadratic_share']:.0%} of the extra "
            f"prefill FLOPs up to {context:,} (all-attention twin: {twin['quadratic_share']:.0%}); "
            f"a {cap:,} cap would save {t['flops_saved']:.0%} of prefill FLOPs and "
            f"{format_bytes(t['cache_bytes_saved'])} of cache ({t['cache_saved']:.0%}) at batch {batch}.")


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, as memory is sold to GPUs)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------ report rows
def memory_rows(cfg: HybridConfig, name: str, contexts: list[int], batches: list[int],
                baseline: HybridConfig | None = None, kv_dtype: str = "bfloat16",
                state_dtype: str | None = None) -> list[dict]:
    """One row per (context, batch): the ``hybridlm memory --json`` output.

    baseline defaults to ``attention_twin(cfg)``.
    """
    base = attention_twin(cfg) if baseline is None else baseline
    cross = crossover_context(cfg, base, kv_dtype, state_dtype)
    rows = []
    for context in contexts:
        for batch in batches:
            ours = cache_bytes(cfg, batch, context, kv_dtype, state_dtype)
            theirs = cache_bytes(base, batch, context, kv_dtype, state_dtype)
            rows.append({
                "preset": name, "context": context, "batch": batch,
                "kv_bytes": ours.kv_bytes, "state_bytes": ours.state_bytes,
                "bookkeeping_bytes": ours.bookkeeping_bytes, "total_bytes": ours.total_bytes,
                "baseline_total_bytes": theirs.total_bytes,
                "reduction": 1.0 - ours.total_bytes / theirs.total_bytes,
                "crossover_context": cross, "by_type": ours.by_type,
                "prefill_flops": prefill_flops(cfg, context),
                "decode_bytes_per_token": decode_bytes_per_token(cfg, context, batch, kv_dtype,
                                                                 state_dtype=state_dtype),
            })
    return rows


def plot_memory(cfg: HybridConfig, name: str, baseline: HybridConfig, baseline_name: str, path: str,
                max_context: int, batch: int = 1, kv_dtype: str = "bfloat16", state_dtype: str | None = None,
                log: bool = False) -> None:
    """PNG of cache GiB vs context (log-scale context) for ``cfg`` and ``baseline``; matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _check_positive("max_context", max_context)
    first = 8 * min(8, max_context.bit_length() - 1)  # from 256 tokens: below that nothing differs
    contexts = sorted({round(2 ** (e / 8)) for e in range(first, 8 * max_context.bit_length() + 1)
                       if 2 ** (e / 8) <= max_context} | {max_context})
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for model, label in ((cfg, name), (baseline, baseline_name)):
        gib = [cache_bytes(model, batch, n, kv_dtype, state_dtype).total_bytes / 2**30 for n in contexts]
        ax.plot(contexts, gib, label=label, linewidth=2)
    cross = crossover_context(cfg, baseline, kv_dtype, state_dtype)
    if cross and cross <= max_context:
        ax.axvline(cross, color="grey", linestyle=":", label=f"crossover {cross:,} tokens")
    ax.set_xscale("log", base=2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"cache GiB (batch {batch}, KV {kv_dtype}, state {state_dtype or cfg.state_dtype})")
    red = reduction(cfg, baseline, batch, max_context, kv_dtype, state_dtype)
    ax.set_title(f"{name}: {red:.0%} less cache than {baseline_name} at {max_context:,}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------ web export
WEB_FIELDS = (
    "num_layers", "layer_pattern", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "head_dim", "sliding_window", "linear_num_key_heads", "linear_num_value_heads",
    "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "linear_normalize",
    "state_dtype", "mla_kv_lora_rank", "mla_qk_rope_head_dim", "sparse_base", "index_head_dim",
    "index_key_bytes",
)


def presets_json() -> str:
    """The presets as JSON: the fields the cache formulas use, the layer types and the source."""
    from hybridlm.presets import PRESETS

    out = {}
    for name, make in PRESETS.items():
        cfg = make()
        entry = {f: getattr(cfg, f) for f in WEB_FIELDS}
        entry["layer_types"] = cfg.layer_types
        entry["source"] = cfg.meta.get("source", "")
        out[name] = entry
    return json.dumps(out, indent=1)


def presets_js() -> str:
    """web/presets.js: the JSON as a script, because pages opened from file:// may not fetch files."""
    return ("// Generated by `python -m hybridlm.memory` from hybridlm.presets; do not edit.\n"
            f"const PRESETS = {presets_json()};\n")


def write_presets_js(path: Path = PRESETS_JS) -> None:
    """Regenerate web/presets.js (run after changing a preset: python -m hybridlm.memory)."""
    Path(path).write_text(presets_js())


# ------------------------------------------------------------------------------ measurement
def measure_cache_allocation(cfg: HybridConfig, batch: int, max_len: int, device="cpu",
                             dtype=None) -> tuple[int, int]:
    """(cache.nbytes(), bytes actually allocated) for a fresh ``HybridLM(cfg).new_cache``.

    On CUDA the allocation is the change of ``torch.cuda.memory_allocated`` across creating the
    cache (the model is built first, so its weights are not counted); elsewhere it is the sum of
    the distinct storages behind the cache's tensors. dtype: the cache's torch dtype (default
    float32, the model's). Example: ``measure_cache_allocation(cfg, 1, 32768, "cuda")``.
    """
    import torch

    from hybridlm.model import HybridLM

    device = torch.device(device)
    dtype = torch.float32 if dtype is None else dtype
    with torch.device("meta"):
        model = HybridLM(cfg)  # weights are not needed to allocate a cache
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        return cache.nbytes(), torch.cuda.memory_allocated(device) - before
    cache = model.new_cache(batch, max_len, device=device, dtype=dtype)
    storages = {}
    for tensors in cache.named_tensors().values():
        for t in tensors:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return cache.nbytes(), sum(storages.values())


if __name__ == "__main__":
    write_presets_js()
    print(f"wrote {PRESETS_JS}")
