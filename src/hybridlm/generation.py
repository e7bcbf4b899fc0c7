"""Text generation: one batched prefill through the chunked path, then one token at a time
through the single-step path, with greedy, temperature, top-k and top-p sampling.

Kept as small separate functions (as in gpt-fast). ``StaticDecoder`` is the fast path: decode
steps with fixed shapes (``HybridLM.decode_static``), captured once in a CUDA graph with the
token choice inside (argmax, or temperature / top-k / top-p sampling by an exponential race), so
each token costs one graph launch and the tokens never leave the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridlm.cache import HybridCache
from hybridlm.ops._checks import env_switch
from hybridlm.ops._inductor import register_inductor_fallbacks

# Greedy steps on CUDA choose the token with one Triton kernel (ops/triton/greedy.py: argmax, token
# buffer, history, slot) instead of torch's argmax and three small ops; HYBRIDLM_GREEDY_KERNEL=0 turns it
# off. H100, compiled 4k batch-1 step, first 12-06 session: 288.2-288.4 tokens/s against 287.4-287.7.
GREEDY_KERNEL = env_switch("HYBRIDLM_GREEDY_KERNEL", "torch's argmax, then the copies", "one kernel", default=True)


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of token ids -> (input_ids [B, T] long, attention_mask [B, T] long), padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("input_ids: expected a non-empty list of non-empty token lists")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), T), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
        mask[i, T - len(p):] = 1
    return ids, mask


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: HybridCache) -> torch.Tensor:
    """Run the whole prompt [B, T] through the model (chunked path); logits of its last position [B, vocab]."""
    return model(input_ids, cache=cache, attention_mask=attention_mask, logits_to_keep=1)[:, -1]


@torch.no_grad()
def decode_one_token(model, token_B: torch.Tensor, cache: HybridCache) -> torch.Tensor:
    """Append one token per row [B] (step path); logits of the next token [B, vocab]."""
    return model(token_B[:, None], cache=cache)[:, -1]


class StaticDecoder:
    """Decoding through one CUDA graph replay per token (eager steps on the CPU).

    The captured step embeds the token buffer, runs every layer on the cache with fixed shapes
    (``HybridLM.decode_static``), chooses the next token inside the step (fused sampling: argmax
    when ``temperature`` is 0, else ``sample_race``: a draw from softmax(logits / temperature)
    after the top-k / top-p filters of ``sample``), writes it into the token buffer and advances
    the slot counter, all on the device: no host sync between tokens. Each step also writes its token
    into a history of the cache's length (int32, [batch, max_len]), column ``slot``, which ``run``
    returns, so nothing is launched between two replays. Sampled draws come from
    ``generator`` without a graph; a CUDA graph draws from the default CUDA generator (seed it with
    ``torch.cuda.manual_seed``), each replay advancing it.

    Build it on an EMPTY cache: capture runs ``warmup`` real steps (Triton compilation, the
    allocator's graph pool), then resets the cache, whose tensors the graph keeps using.
    ``compile=True`` runs the step through ``torch.compile`` first (fewer, fused kernels per layer;
    compiling a 48-layer model takes minutes).

    Example::

        cache = model.new_cache(batch, prompt_len + n + 1)
        dec = StaticDecoder(model, cache)                  # captures on CUDA, leaves the cache empty
        first = prefill(model, prompt_ids, None, cache).argmax(-1)
        new_tokens = dec.run(first, n)                     # [batch, n], greedy
        dec = StaticDecoder(model, cache, temperature=0.8, top_p=0.95)   # sampled inside the graph
    """

    def __init__(self, model, cache: HybridCache, graph: bool | None = None, warmup: int = 2,
                 compile: bool = False, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> None:
        _check_sampling(1, temperature, top_k, top_p)
        if cache.seq_len != 0:
            raise ValueError(f"cache: expected an empty cache (seq_len 0), got seq_len {cache.seq_len}; "
                             "build the decoder before prefilling (it resets the cache after its warm-up)")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or not 1 <= warmup < cache.max_len:
            raise ValueError(f"warmup: expected an int in [1, max_len = {cache.max_len}), got {warmup!r}")
        device = cache.next_position.device
        use_graph = device.type == "cuda" if graph is None else graph
        if generator is not None and use_graph:
            raise ValueError("generator: a CUDA graph samples from the default CUDA generator; seed it with "
                             "torch.cuda.manual_seed, or pass graph=False to use this generator")
        if graph and device.type != "cuda":
            raise ValueError(f"graph: CUDA graphs need a cache on a CUDA device, got {device}")
        self.model, self.cache = model, cache
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        # stack weights read together (MoE experts, projections of one input) now, outside the
        # traced and captured step
        model.pack_for_inference()
        # compile: let torch.compile fuse the step's many small element-wise kernels (norms, gates,
        # routing) before the graph captures it; the custom Triton ops stay as they are
        if compile:
            # our custom ops as inductor fallbacks up front: torch <= 2.11 otherwise formats every
            # argument's whole IR for a log line, which stalled the 48-layer step (ops/_inductor.py)
            register_inductor_fallbacks()
        self._decode = torch.compile(model.decode_static, dynamic=False) if compile else model.decode_static
        self.token_B1 = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.history_BL = torch.zeros(cache.batch_size, cache.max_len, dtype=torch.int32, device=device)
        # the greedy kernel's scratch, allocated at the first (warm-up, uncaptured) step
        self._greedy = GREEDY_KERNEL and temperature == 0 and device.type == "cuda"
        self._greedy_scratch = None
        self.graph = None
        if use_graph:
            self._capture(warmup)

    def _step(self) -> None:
        logits = self._decode(self.token_B1, self.cache, self.slot)
        if self._greedy:  # argmax, token buffer, history, slot += 1: one kernel
            from hybridlm.ops.triton.greedy import greedy_scratch, greedy_token_

            if self._greedy_scratch is None:
                self._greedy_scratch = greedy_scratch(*logits.shape, logits.device)
            greedy_token_(logits, self.token_B1, self.slot, self.history_BL, self._greedy_scratch)
            return
        if self.temperature == 0:
            token = logits.argmax(-1)
        else:
            token = sample_race(logits, self.temperature, self.top_k, self.top_p, self.generator)
        self.token_B1.copy_(token[:, None])
        self.history_BL.index_copy_(1, self.slot, token[:, None].to(torch.int32))
        self.slot += 1

    def _capture(self, warmup: int) -> None:
        # warm-up on a side stream, as torch.cuda.graphs asks, then capture one step
        side = torch.cuda.Stream(device=self.slot.device)
        side.wait_stream(torch.cuda.current_stream(self.slot.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(self.slot.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.cache.reset()

    @torch.no_grad()
    def run(self, token_B: torch.Tensor, steps: int) -> torch.Tensor:
        """Feed token_B [B] (the token after the cached ones), decode ``steps`` tokens.

        Returns the new tokens [B, steps] long (the first is the model's answer to token_B); the cache
        advances by ``steps`` slots.
        """
        cache = self.cache
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
        if cache.seq_len + steps > cache.max_len:
            raise ValueError(f"steps: {steps} more tokens would pass the cache's max_len={cache.max_len} "
                             f"({cache.seq_len} cached)")
        if tuple(token_B.shape) != (cache.batch_size,):
            raise ValueError(f"token_B: expected shape ({cache.batch_size},), got {tuple(token_B.shape)}")
        start = cache.seq_len
        self.token_B1.copy_(token_B[:, None])
        self.slot.fill_(start)
        for _ in range(steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        cache.seq_len += steps
        return self.history_BL[:, start:start + steps].long()


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int | None,
                  top_p: float | None) -> torch.Tensor:
    """float32 logits / temperature [B, vocab] with every token outside the top-k, then outside the
    smallest set whose probability reaches top_p, set to -inf (the most likely token always stays).
    No host sync: usable inside a CUDA graph."""
    logits = logits_BV.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row [B] long from logits [B, vocab]: argmax when temperature == 0, else a
    draw from softmax(logits / temperature) restricted by ``filter_logits`` (torch.multinomial)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = filter_logits(logits_BV, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample_race(logits_BV: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The same distribution as ``sample`` (temperature > 0), drawn without a host sync: with
    E_i ~ Exp(1) independent, argmax_i p_i / E_i is token i with probability p_i (E_i / p_i is
    exponential with rate p_i, and the smallest of independent exponentials is i with probability
    rate_i / sum of rates). Filtered tokens have p_i = 0 and never win. Returns [B] long."""
    probs = filter_logits(logits_BV, temperature, top_k, top_p).softmax(-1)
    # clamped: a draw of exactly 0 would make 0 / 0 = NaN, which argmax would pick
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(-1)


def generate(model, input_ids, max_new_tokens: int, *, attention_mask: torch.Tensor | None = None,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a HybridLM (anything with ``new_cache`` and ``forward(ids, cache, attention_mask)``).
        input_ids: LongTensor [B, T] (left-padded if ``attention_mask`` is given) or a list of B
            token-id lists of any lengths (left-padded here).
        max_new_tokens: N >= 1.
        attention_mask: optional [B, T] 0/1 for a tensor input, 1 = real token, padding on the left.
        temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
        top_k: optional int >= 1, sample among the k most likely tokens.
        top_p: optional float in (0, 1], nucleus sampling.
        stop_tokens: optional token ids; a row stops after emitting one (it is kept in the output).
        pad_token_id: fills the input padding and every position after a row stopped.
        generator: optional torch.Generator for reproducible sampling.
    Returns:
        LongTensor [B, N] of new tokens (prompts not included); positions after a row's stop
        token hold pad_token_id. Generation ends early when every row has stopped.

    Example::

        model = HybridLM(HybridConfig.preset("tiny-hybrid-3to1"))
        new = generate(model, [[1, 2, 3], [4, 5]], 8)                 # [2, 8]
    """
    ids, mask = _as_batch(model, input_ids, attention_mask, pad_token_id)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    B, T = ids.shape
    stops = torch.as_tensor(list(stop_tokens or []), dtype=torch.long, device=ids.device)
    cache = model.new_cache(B, T + max_new_tokens)
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=ids.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    logits = prefill(model, ids, mask, cache)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out[:, i] = token
        done |= torch.isin(token, stops)
        if i + 1 == max_new_tokens or bool(done.all()):
            break
        logits = decode_one_token(model, token, cache)
    return out


def _as_batch(model, input_ids, attention_mask, pad_token_id):
    """(ids [B, T] long, mask [B, T] or None) on the model's device; lists are left-padded."""
    if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
        raise ValueError(f"pad_token_id: expected a non-negative int, got {pad_token_id!r}")
    device = next(model.parameters()).device
    if isinstance(input_ids, (list, tuple)):
        if attention_mask is not None:
            raise ValueError("attention_mask: give it only with a tensor input_ids (lists are padded here)")
        return left_pad(input_ids, pad_token_id, device)
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids: expected a LongTensor [B, T] or a list of token lists, "
                        f"got {type(input_ids).__name__}")
    if attention_mask is None:
        return input_ids.to(device), None
    mask = torch.as_tensor(attention_mask, device=device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(mask.shape)}")
    m = mask.long()
    if (m[:, 1:] < m[:, :-1]).any():
        raise ValueError("attention_mask: expected left padding (each row 0...0 1...1)")
    if (m[:, -1] == 0).any():
        raise ValueError("attention_mask: every row needs at least one real token")
    return input_ids.to(device), mask


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
