"""Long-context inference profiling: time to first token, decode tokens/s, peak and cache memory,
against the bandwidth-bound limit and the largest batch that fits.

One row per (model, context, batch). The prompt is prefilled in chunks through the cache (so a
1M-token prompt needs activations for one chunk only), then ``decode_steps`` greedy tokens are
decoded one at a time. Timings are wall clock around synchronised device work, after a warm-up at
the same chunk shapes. The bandwidth-bound limit divides a copy bandwidth measured on the device
in the same run by the bytes one decoded token must move (``hybridlm.memory.decode_bytes_per_token``).

Example::

    from hybridlm.config import HybridConfig
    from hybridlm.profile import ProfileSettings, profile_models
    cfg = HybridConfig.preset("tiny-qwen3-next")
    rows = profile_models({"hybrid": cfg}, [256, 1024], [1, 2], ProfileSettings(device="cpu"))
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from hybridlm import memory
from hybridlm.config import HybridConfig
from hybridlm.generation import StaticDecoder, decode_one_token
from hybridlm.model import HybridLM
from hybridlm.ops._checks import pdl_on, pdl_order

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# tokens (all prompts of the batch together) per prefill call when ProfileSettings.prefill_chunk is None
PREFILL_TOKENS = {"cuda": 16384, "cpu": 2048}
ROW_KEYS = ("model", "engine", "context", "batch", "ttft_s", "decode_tokens_per_s", "peak_bytes", "cache_bytes")


@dataclass
class ProfileSettings:
    """How to run: device ("cpu" | "cuda" | "cuda:1"), dtype (weights, KV and conv windows),
    decode_steps greedy tokens timed per row, prefill_chunk tokens of each prompt per prefill call
    (None: ``chunk_for`` spreads PREFILL_TOKENS over the batch), seed of the random prompt;
    memory_budget: bytes the caches may take for the largest-batch answer (default: the device's free
    memory once the model is loaded); graph: decode through a CUDA graph of the
    fixed-shape step (``StaticDecoder``; default: on CUDA, when every layer letter has a static step),
    else the eager step; fill: skip the prefill and fill the cache with random keys, values and states
    instead (decode speed does not depend on their values, and a prefill of a large batch at a long
    context can take minutes): rows then have no time to first token (None); compile: torch.compile
    the decode step before the graph captures it (StaticDecoder's ``compile``); prefill_repeats:
    prefill the prompt this many times (the cache emptied between) and report the median time to first
    token (one prefill is one noisy sample: three identical 4k prefills on an H200 took 0.47-0.91 s).
    The weights are random too: speed and memory do not depend on their values."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    decode_steps: int = 32
    prefill_chunk: int | None = None
    seed: int = 0
    memory_budget: int | None = None
    graph: bool | None = None
    fill: bool = False
    compile: bool = False
    prefill_repeats: int = 1

    def __post_init__(self) -> None:
        for name in ("decode_steps", "prefill_chunk", "prefill_repeats"):
            value = getattr(self, name)
            if value is None and name == "prefill_chunk":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1{' or None' * (name == 'prefill_chunk')}, "
                                 f"got {value!r}")
        if self.memory_budget is not None and (not isinstance(self.memory_budget, int) or self.memory_budget < 1):
            raise ValueError(f"memory_budget: expected None or an int >= 1 (bytes), got {self.memory_budget!r}")
        for name in ("fill", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.graph is not None and not isinstance(self.graph, bool):
            raise TypeError(f"graph: expected None or a bool, got {self.graph!r}")
        if self.dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype: expected one of {list(DTYPE_NAMES.values())}, got {self.dtype!r}")
        device = torch.device(self.device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:n]', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {self.device!r} asked for, but torch sees no CUDA device")

    def use_graph(self, cfg: HybridConfig) -> bool:
        """Whether rows of ``cfg`` decode through StaticDecoder's CUDA graph."""
        static = not set(cfg.layer_types) & set("WMS")
        if self.graph is None:
            return self.torch_device.type == "cuda" and static
        if self.graph and not static:
            raise ValueError(f"graph: layers {sorted(set(cfg.layer_types) & set('WMS'))} have no static decode "
                             "step; use graph=None or False")
        return self.graph

    def chunk_for(self, batch: int) -> int:
        """Tokens of each prompt per prefill call at ``batch``: prefill_chunk when set, else
        PREFILL_TOKENS[device type] // batch, rounded down to a multiple of 64 (the chunked kernels'
        block) when at least 64.

        The prefill of a batch-1 prompt is host-bound at small calls: on an H200, Qwen3-Next's layers
        (48, 32 experts) spend ~2.1 ms of host time per layer and call against ~1.2 ms of kernels for
        2k tokens, so a 4k prompt took 0.209 s in 2k calls and 0.108 s in one call; 32k took 1.82 /
        1.06 / 0.99 s in 2k / 8k / 16k calls. A budget per call rather than per prompt keeps the
        activations (and so the largest batch that fits) independent of the batch. On the CPU each
        call materialises [chunk, context] attention scores, so the budget stays at 2k."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        chunk = max(1, PREFILL_TOKENS[self.torch_device.type] // batch)
        return chunk // 64 * 64 if chunk >= 64 else chunk

    @property
    def torch_device(self) -> torch.device:
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]


def scaled_config(preset: str, layers: int | None = None, experts: int | None = None) -> HybridConfig:
    """A preset with its layer and expert counts cut to fit one card (dimensions otherwise kept).

    experts: routed experts per MoE layer; experts per token shrink with it when they would exceed it.
    """
    cfg = HybridConfig.preset(preset)
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers: expected an int >= 1, got {layers!r}")
        cfg = cfg.replace(num_layers=layers)
    if experts is not None:
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"experts: expected an int >= 1, got {experts!r}")
        if not cfg.num_experts:
            raise ValueError(f"experts: preset {preset!r} has no MoE layers to cut")
        cfg = cfg.replace(num_experts=experts, num_experts_per_tok=min(cfg.num_experts_per_tok, experts))
    return cfg


def build_model(cfg: HybridConfig, settings: ProfileSettings) -> HybridLM:
    """HybridLM(cfg) with random weights, built directly on the device (initialising a multi-GB model
    on the CPU first would take minutes), cast to settings.dtype, in eval mode."""
    torch.manual_seed(settings.seed)
    with torch.device(settings.torch_device):
        model = HybridLM(cfg)
    return model.to(settings.dtype).eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers (a tied weight counts once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


# ------------------------------------------------------------------------------ device helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def card_name(device: torch.device) -> str:
    """The GPU's name (e.g. 'NVIDIA H200'), or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def release(device: torch.device) -> None:
    """Hand cached CUDA blocks back, so the next row's peak and free memory start clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    """Memory a new allocation could still get: CUDA free + what torch's allocator holds unused;
    on CPU, the kernel's MemAvailable (None where /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def copy_bandwidth(device: torch.device, nbytes: int | None = None, trials: int = 5, copies: int = 10) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting the read and the write.

    nbytes defaults to 1 GiB on CUDA (capped at a quarter of free memory) and 64 MiB on CPU: far
    past the caches, so the copy runs at memory speed. Each trial times ``copies`` back-to-back
    copies between two synchronisations (so launch and sync overheads do not count); median trial.
    """
    if nbytes is None:
        nbytes = 2**26 if device.type == "cpu" else min(2**30, (free_bytes(device) or 2**30) // 4)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up: first touch of dst's pages, kernel launch set-up
    times = []
    for _ in range(trials):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(copies):
            dst.copy_(src)
        synchronize(device)
        times.append((time.perf_counter() - t0) / copies)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def bytes_per_token(cfg: HybridConfig, context: int, batch: int, dtype_name: str) -> float:
    """Bytes moved per decoded token at ``context`` (each of ``batch`` rows there), as
    memory.decode_bytes_per_token counts them (state read and written, one embedding row)."""
    return memory.decode_bytes_per_token(cfg, context, batch, kv_dtype=dtype_name, weight_dtype=dtype_name)["total"]


def analytic_max_batch(cfg: HybridConfig, context: int, budget: int | None, dtype_name: str,
                       extra_per_row: float = 0.0) -> int | None:
    """Largest batch whose cache (memory.py, ``context`` slots) plus ``extra_per_row`` activation
    bytes per row fits ``budget`` bytes; None when the budget is unknown. Cache bytes are linear in
    the batch, so one division answers it."""
    if budget is None:
        return None
    per_row = memory.cache_bytes(cfg, 1, context, kv_dtype=dtype_name).total_bytes + extra_per_row
    return max(0, int(budget // per_row))


# ------------------------------------------------------------------------------ one measurement
@torch.no_grad()
def prefill_chunked(model: HybridLM, ids_BT: torch.Tensor, cache, chunk: int) -> torch.Tensor:
    """Feed the prompt ids_BT [B, T] long through the cache ``chunk`` tokens at a time; logits of
    the last position [B, vocab] in the model dtype."""
    for start in range(0, ids_BT.shape[1], chunk):
        logits = model(ids_BT[:, start:start + chunk], cache=cache, logits_to_keep=1)
    return logits[:, -1]


@torch.no_grad()
def decode_greedy(model: HybridLM, token_B: torch.Tensor, cache, steps: int) -> torch.Tensor:
    """``steps`` greedy decode steps from token_B [B] long; the last token [B]."""
    for _ in range(steps):
        token_B = decode_one_token(model, token_B, cache).argmax(-1)
    return token_B


def warmup_length(context: int, chunk: int) -> int:
    """A prompt that runs every chunk shape the real prefill runs: a first chunk on an empty cache,
    then the final (possibly shorter) chunk on a filled one."""
    if context <= chunk:
        return context
    return chunk + (context % chunk or chunk)


def measure(model: HybridLM, context: int, batch: int, settings: ProfileSettings) -> dict:
    """Time to first token, decode rate and memory of one (context, batch) on ``model``.

    Returns ttft_s, decode_tokens_per_s (all rows together), decode_step_s, peak_bytes (CUDA peak
    allocated during prefill + decode, weights included; None on CPU, where torch keeps no such
    count), cache_bytes (cache.nbytes()).
    """
    device, steps = settings.torch_device, settings.decode_steps
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    vocab = model.config.vocab_size
    cache = model.new_cache(batch, context + steps + 1)
    graphed = settings.use_graph(model.config)
    if graphed and settings.compile:
        # each row brings new shapes, so each recompiles the step: past torch.compile's recompile
        # limit (8 by default) it would silently run the step uncompiled; start every row afresh
        torch.compiler.reset()
    decoder = StaticDecoder(model, cache, graph=True, compile=settings.compile) if graphed else None
    decode = (lambda token, n: decoder.run(token, n)[:, -1]) if graphed else \
        (lambda token, n: decode_greedy(model, token, cache, n))
    if settings.fill:
        return _measure_filled(model, cache, context, batch, settings, decode, graphed)
    chunk = settings.chunk_for(batch)
    warm = torch.randint(0, vocab, (batch, warmup_length(context, chunk)), generator=gen, device=device)
    decode(prefill_chunked(model, warm, cache, chunk).argmax(-1), 2)
    cache.reset()
    ids = torch.randint(0, vocab, (batch, context), generator=gen, device=device)
    ttfts = []
    for repeat in range(settings.prefill_repeats):
        if repeat:
            cache.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        t0 = time.perf_counter()
        first = prefill_chunked(model, ids, cache, chunk).argmax(-1)
        synchronize(device)
        ttfts.append(time.perf_counter() - t0)
    ttft = statistics.median(ttfts)
    t1 = time.perf_counter()
    decode(first, steps)
    synchronize(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"decode": ("compiled " if graphed and settings.compile else "") + ("cuda graph" if graphed else "eager"),
            "ttft_s": ttft, "ttft_runs_s": ttfts, "prefill_chunk": chunk,
            "prefill_tokens_per_s": batch * context / ttft,
            "decode_tokens_per_s": batch * steps / (t2 - t1), "decode_step_s": (t2 - t1) / steps,
            "peak_bytes": peak, "cache_bytes": cache.nbytes(), "cache_max_len": cache.max_len}


@torch.no_grad()
def fill_cache(cache, context: int, seed: int = 0) -> None:
    """Make ``cache`` look as if ``context`` tokens had been prefilled: keys, values and latents
    normal(0, 1), recurrent states normal(0, 0.01), conv windows normal(0, 1), positions 0..context-1.
    For decode timing only (the values are not a model's)."""
    if context >= cache.max_len:
        raise ValueError(f"context: expected < the cache's max_len {cache.max_len}, got {context}")
    gen = torch.Generator(device=cache.next_position.device).manual_seed(seed)
    for slot in cache.layers:
        for name, t in vars(slot).items():
            if not isinstance(t, torch.Tensor) or name == "k_pos" or not t.is_floating_point() \
                    or t.dtype.itemsize == 1:
                continue
            if name == "state":
                t.normal_(0.0, 0.01, generator=gen)
            elif name == "conv":
                t.normal_(0.0, 1.0, generator=gen)
            else:  # per-token tensors [B, max_len, ...]: only the first `context` slots
                t[:, :context].normal_(0.0, 1.0, generator=gen)
    positions = torch.arange(context, dtype=torch.int32, device=cache.next_position.device)
    if cache.positions is not None:
        cache.positions[:, :context] = positions
    if cache.window_positions is not None:
        n = cache.window_slots
        cache.window_positions[:] = -1
        last = positions[-min(n, context):]
        cache.window_positions[:, last % n] = last
    cache.next_position.fill_(context)
    cache.seq_len = context


def _measure_filled(model: HybridLM, cache, context: int, batch: int, settings: ProfileSettings, decode,
                    graphed: bool) -> dict:
    device, steps = settings.torch_device, settings.decode_steps
    first = torch.randint(0, model.config.vocab_size, (batch,), device=device,
                          generator=torch.Generator(device=device).manual_seed(settings.seed))
    fill_cache(cache, context, settings.seed)
    decode(first, 2)  # warm-up at this shape
    fill_cache(cache, context, settings.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    decode(first, steps)
    synchronize(device)
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"decode": ("compiled " if graphed and settings.compile else "") + ("cuda graph" if graphed else "eager"),
            "ttft_s": None, "prefill_tokens_per_s": None,
            "decode_tokens_per_s": batch * steps / dt, "decode_step_s": dt / steps, "peak_bytes": peak,
            "cache_bytes": cache.nbytes(), "cache_max_len": cache.max_len, "filled": True}


def profile_model(name: str, cfg: HybridConfig, contexts: list[int], batches: list[int],
                  settings: ProfileSettings, bandwidth: float, max_batch_search: bool = False,
                  transformers: bool = False, at_max_batch: bool = False) -> list[dict]:
    """Rows of one model at every (context, batch); see profile_models."""
    device, dt = settings.torch_device, settings.dtype_name
    model = build_model(cfg, settings)
    weights = weight_bytes(model)
    rows = []
    for context in contexts:
        budget = free_bytes(device) if settings.memory_budget is None else settings.memory_budget
        here = [_row(model, name, context, batch, settings, bandwidth, weights) for batch in batches]
        # activations seen on CUDA (peak beyond weights and cache), so the analytic answer leaves room
        # for the prefill as well as the cache: per row when each prompt's chunk is fixed, once when
        # the tokens per call are (the default: chunk_for)
        seen = [(r["peak_bytes"] - weights - r["cache_bytes"], r["batch"]) for r in here if r["peak_bytes"] is not None]
        if settings.prefill_chunk is None:
            fixed, extra = max([a for a, _ in seen] + [0]), 0.0
        else:
            fixed, extra = 0, max([a / b for a, b in seen] + [0.0])
        room = None if budget is None else max(0, budget - fixed)
        top = analytic_max_batch(cfg, context + settings.decode_steps + 1, room, dt, extra)
        found = search_max_batch(model, context, settings, top) if max_batch_search and top else None
        if at_max_batch and (found or top) and (found or top) not in batches:
            here.append(_row_at_most(model, name, context, found or top, settings, bandwidth, weights))
        for row in here:
            row["max_batch"], row["max_batch_found"] = top, found
        rows += here
    if transformers:
        rows += [measure_transformers(model, name, context, batch, settings)
                 for context in contexts for batch in batches]
    del model
    release(device)
    return rows


def _row(model: HybridLM, name: str, context: int, batch: int, settings: ProfileSettings, bandwidth: float,
         weights: int) -> dict:
    """One measured row; on CUDA out of memory, a row of None figures with an "error" entry."""
    cfg, dt = model.config, settings.dtype_name
    row = {"model": name, "engine": "hybridlm", "layer_types": cfg.layer_types, "device": str(settings.torch_device),
           "card": card_name(settings.torch_device), "pdl": pdl_on(settings.torch_device),
           "pdl_order": pdl_order() if pdl_on(settings.torch_device) else None,
           "dtype": dt, "context": context, "batch": batch, "weight_bytes": weights,
           "copy_bandwidth_bytes_per_s": bandwidth, "bytes_per_token": bytes_per_token(cfg, context, batch, dt)}
    try:
        got = measure(model, context, batch, settings)
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory", "ttft_s": None, "decode_tokens_per_s": None, "peak_bytes": None,
                "cache_bytes": None}
    finally:
        release(settings.torch_device)
    bound = bandwidth / row["bytes_per_token"]
    return {**row, **got, "bandwidth_bound_tokens_per_s": bound, "bandwidth_share": got["decode_tokens_per_s"] / bound,
            "cache_bytes_memory_py": memory.cache_bytes(cfg, batch, got["cache_max_len"], kv_dtype=dt).total_bytes}


def _row_at_most(model: HybridLM, name: str, context: int, batch: int, settings: ProfileSettings,
                 bandwidth: float, weights: int) -> dict:
    """A row at the largest batch that runs, from ``batch`` down by 10% steps while out of memory
    (the analytic batch counts the activations seen at smaller batches, which may fall short)."""
    while True:
        row = _row(model, name, context, batch, settings, bandwidth, weights)
        if "error" not in row or batch == 1:
            return {**row, "at_max_batch": True}
        batch = max(1, batch * 9 // 10)


def profile_models(models: dict[str, HybridConfig], contexts: list[int], batches: list[int],
                   settings: ProfileSettings, max_batch_search: bool = False, transformers: bool = False,
                   at_max_batch: bool = False) -> list[dict]:
    """Profile each named config at every context (ints >= 1) and batch (ints >= 1).

    Returns one dict per (model, context, batch) with at least ROW_KEYS, plus prefill_tokens_per_s,
    decode_step_s, weight_bytes, cache_bytes_memory_py (memory.py's bytes for the same cache),
    bytes_per_token, copy_bandwidth_bytes_per_s, bandwidth_bound_tokens_per_s, bandwidth_share,
    max_batch (analytic, from free memory after loading the model; on CUDA including the activations
    seen per row) and max_batch_found (by allocation, with max_batch_search on CUDA; else None).
    at_max_batch=True adds a row per context at that largest batch (max_batch_found, else max_batch),
    marked "at_max_batch": the batch at which a model's throughput is compared with another's.
    A row that ran out of CUDA memory has None figures and an "error" entry.
    transformers=True adds rows for transformers' generate on the first model's weights (engine
    "transformers"; needs a model type that holds it, see hybridlm.checkpoints.infer_model_type).
    """
    _check_sizes("contexts", contexts)
    _check_sizes("batches", batches)
    if not models:
        raise ValueError("models: expected at least one {name: HybridConfig}")
    if max_batch_search:
        _require_cuda(settings.torch_device)
    if at_max_batch and settings.torch_device.type == "cpu" and settings.memory_budget is None:
        raise ValueError("at_max_batch: on the CPU give memory_budget (bytes); the batch that fills free RAM "
                         "would swap rather than fail")
    bandwidth = copy_bandwidth(settings.torch_device)
    rows = []
    for i, (name, cfg) in enumerate(models.items()):
        # transformers for the first model only: the twin has no transformers model type to load it
        rows += profile_model(name, cfg, contexts, batches, settings, bandwidth, max_batch_search,
                              transformers and i == 0, at_max_batch)
    return rows


def _check_sizes(name: str, values) -> None:
    if not isinstance(values, (list, tuple)) or not values or any(
            not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
        raise ValueError(f"{name}: expected a non-empty list of ints >= 1, got {values!r}")


def search_max_batch(model: HybridLM, context: int, settings: ProfileSettings, analytic: int) -> int:
    """Largest batch (up to 2 * analytic) whose cache allocates and whose first and last prefill
    chunk and one decode step run without running out of memory; binary search.

    Only on CUDA: on the CPU an allocation past free memory swaps or is killed instead of failing.
    """
    _require_cuda(settings.torch_device)
    lo, hi = 0, 2 * analytic
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(model, context, mid, settings):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("max_batch_search: needs a CUDA device (on the CPU an allocation past free memory "
                         "swaps or gets the process killed instead of raising)")


def _fits(model: HybridLM, context: int, batch: int, settings: ProfileSettings) -> bool:
    chunk, device = settings.chunk_for(batch), settings.torch_device
    try:
        cache = model.new_cache(batch, context + settings.decode_steps + 1)
        ids = torch.zeros(batch, min(chunk, context), dtype=torch.long, device=device)
        prefill_chunked(model, ids, cache, chunk)
        cache.seq_len = context - ids.shape[1]  # the last chunk attends over a full cache
        first = prefill_chunked(model, ids, cache, chunk).argmax(-1)
        decode_greedy(model, first, cache, 1)
        synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        cache = ids = first = None
        release(device)


# ------------------------------------------------------------------------------ transformers
def measure_transformers(model: HybridLM, name: str, context: int, batch: int, settings: ProfileSettings) -> dict:
    """transformers' generate on ``model``'s weights (saved, then loaded by AutoModelForCausalLM):
    time to first token = a 1-token generate (median of settings.prefill_repeats); decode rate from
    a (decode_steps + 1)-token generate minus that. Greedy, every row the full context, warm-up
    generate first. Out of memory on CUDA gives a row of None figures with an "error" entry instead
    of ending the profile."""
    from transformers import AutoModelForCausalLM

    device, steps = settings.torch_device, settings.decode_steps
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        # dtype after loading: the keyword is torch_dtype before transformers 4.56 and dtype after
        hf = AutoModelForCausalLM.from_pretrained(folder).to(device=device, dtype=settings.dtype).eval()
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen, device=device)
    row = {"model": f"{name} (transformers)", "engine": "transformers", "layer_types": model.config.layer_types,
           "device": str(device), "dtype": settings.dtype_name, "context": context, "batch": batch,
           "cache_bytes": None, "peak_bytes": None, "ttft_s": None, "decode_tokens_per_s": None}

    def run(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - t0

    try:
        run(2)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ttfts = [run(1) for _ in range(settings.prefill_repeats)]
        ttft = statistics.median(ttfts)
        total = run(steps + 1)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        return row
    finally:
        del hf
        release(device)
    row.update(ttft_s=ttft, ttft_runs_s=ttfts, decode_tokens_per_s=batch * steps / max(total - ttft, 1e-9),
               peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return row
