"""`hybridlm <command>`: the command-line interface.

Each command has an ``_add_<name>(sub)`` function that declares its arguments and a
``_cmd_<name>(args)`` function that runs it. Heavy imports (torch, matplotlib) happen inside the
command functions so ``hybridlm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_size(text: str) -> int:
    """'4k' -> 4096, '1m' -> 1048576, '262144' -> 262144 (binary multiples, as context lengths are)."""
    t = text.strip().lower()
    mult = {"k": 1024, "m": 1024**2, "g": 1024**3}.get(t[-1:], 1)
    num = t[:-1] if mult > 1 else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 4096, 4k or 1m, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def parse_size_list(text: str) -> list[int]:
    return [parse_size(p) for p in text.split(",") if p.strip()]


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas or spaces, got {text!r}") from None


# --------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="layers, parameters and cache bytes of a preset",
                       description="Print a preset's layer layout, parameter count and cache bytes at a context.")
    p.add_argument("--preset", default="tiny-hybrid-3to1", help="preset name (default: %(default)s)")
    p.add_argument("--context", type=parse_size, default=4096, help="context length, e.g. 4096 or 32k")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cmd_info(args) -> int:
    import torch

    from hybridlm.config import HybridConfig
    from hybridlm.model import HybridLM

    cfg = HybridConfig.preset(args.preset)
    with torch.device("meta"):
        model = HybridLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    cache = model.new_cache(args.batch, args.context, device="meta")
    info = {
        "preset": args.preset,
        "layers": cfg.num_layers,
        "layer_types": cfg.layer_types,
        "hidden_size": cfg.hidden_size,
        "parameters": n_params,
        "context": args.context,
        "batch": args.batch,
        "cache_bytes": cache.nbytes(),
        "cache_breakdown": cache.breakdown(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"preset        {args.preset}")
    print(f"layers        {cfg.num_layers}  ({cfg.layer_types})")
    print(f"parameters    {n_params:,}")
    print(f"cache bytes   {info['cache_bytes']:,}  (batch {args.batch}, context {args.context:,})")
    for name, nbytes in info["cache_breakdown"].items():
        print(f"  {name:<22} {nbytes:,}")
    return 0


# --------------------------------------------------------------------------- generate
def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a checkpoint (--model) or a random-weight preset",
                       description="Build a preset with seeded random weights and print the ids it generates "
                                   "after --prompt-ids (prefill, then one token at a time through the cache).")
    p.add_argument("--preset", default="tiny-hybrid-3to1", help="preset name (default: %(default)s)")
    p.add_argument("--prompt-ids", type=parse_int_list, default=None, help='token ids, e.g. "1 2 3"')
    p.add_argument("--model", metavar="PATH", default=None,
                   help="checkpoint instead of --preset: a Hugging Face or hybridlm folder, or a training run")
    p.add_argument("--prompt", metavar="TEXT", default=None,
                   help="prompt text, encoded with the --model folder's tokenizer.json (instead of --prompt-ids)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the sampler (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")


def _cmd_generate(args) -> int:
    import torch

    from hybridlm.config import HybridConfig
    from hybridlm.generation import generate
    from hybridlm.model import HybridLM

    from hybridlm.checkpoints.convert import load_model, prompt_ids, stop_tokens

    ids, tokenizer = prompt_ids(args.model, args.prompt, args.prompt_ids)
    torch.manual_seed(args.seed)
    model = load_model(args.model) if args.model else HybridLM(HybridConfig.preset(args.preset)).eval()
    generator = torch.Generator().manual_seed(args.seed)
    new = generate(model, [ids], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=generator, stop_tokens=stop_tokens(model))
    print(tokenizer.decode(new[0].tolist()) if tokenizer else " ".join(str(t) for t in new[0].tolist()))
    return 0


# --------------------------------------------------------------------------- convert
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="Hugging Face checkpoints in and out",
                       description="--from-hf IN: read a Hugging Face folder (qwen3_next, qwen3_5, kimi_linear, "
                                   "minimax, minimax_m2, deepseek_v32, qwen3, llama) and write it in hybridlm's own layout. --to-hf IN: read a "
                                   "hybridlm or Hugging Face folder or a training run and write a Hugging Face "
                                   "folder that transformers loads. Tokenizer files are copied along.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="IN", help="Hugging Face checkpoint folder to import")
    src.add_argument("--to-hf", metavar="IN", help="model to export: a folder with config.json or a training run")
    p.add_argument("--out", metavar="OUT", required=True, help="output folder")
    p.add_argument("--model-type", default=None,
                   help="with --to-hf: qwen3_next, qwen3_5_text, qwen3_5_moe_text, minimax_m2, kimi_linear, "
                        "minimax, deepseek_v32, qwen3 or llama "
                        "(default: the type it was loaded from, else inferred from the layers)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default=None,
                   help="tensor dtype of the output (default: the input's)")
    p.add_argument("--max-shard-size", type=parse_size, default=None, metavar="BYTES",
                   help="largest safetensors shard, e.g. 2g (default: 5g)")


def _cmd_convert(args) -> int:
    from hybridlm.checkpoints.convert import convert

    out = convert(args.from_hf or args.to_hf, args.out, to_hf=args.to_hf is not None, model_type=args.model_type,
                  dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- memory
def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="analytic cache memory, crossover and n^2 tax of a preset or config",
                       description="Cache bytes (KV + recurrent state) at each context and batch, against the "
                                   "model's all-attention twin (or --vs PRESET): reduction, crossover context, "
                                   "prefill FLOPs and bytes read per decoded token.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default="qwen3-next-80b-a3b", help="preset name (default: %(default)s)")
    src.add_argument("--config", help="a Hugging Face config.json (or its folder) or a saved HybridConfig JSON")
    p.add_argument("--context", type=parse_size_list, default=[4096, 32768, 131072, 262144],
                   help="context lengths, e.g. 4k,32k,128k,262144 (default: %(default)s)")
    p.add_argument("--batch", type=parse_int_list, default=[1], help="batch sizes, e.g. 1,8 (default: %(default)s)")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                   help="recurrent state dtype (default: the config's, float32)")
    p.add_argument("--kv-dtype", choices=("bfloat16", "float16", "float32", "float64"), default="bfloat16",
                   help="dtype of K/V, latents and conv windows (default: %(default)s)")
    p.add_argument("--vs", metavar="PRESET", help="compare against this preset instead of the all-attention twin")
    p.add_argument("--cap", type=parse_size, default=32768, help="context cap for the n^2-tax line (default: 32k)")
    p.add_argument("--plot", metavar="PNG", help="draw memory vs context for the model and its baseline")
    p.add_argument("--log", action="store_true", help="log-scale memory axis in --plot")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")


def _cmd_memory(args) -> int:
    from hybridlm import memory
    from hybridlm.config import LAYER_LETTERS, HybridConfig

    if any(b <= 0 for b in args.batch) or not args.batch:
        raise ValueError(f"--batch: expected positive integers, got {args.batch}")
    if args.config:
        from hybridlm.hf_config import load_config

        cfg, name = load_config(args.config), args.config
    else:
        cfg, name = HybridConfig.preset(args.preset), args.preset
    base = HybridConfig.preset(args.vs) if args.vs else memory.attention_twin(cfg)
    base_name = args.vs or "all-attention twin"
    rows = memory.memory_rows(cfg, name, args.context, args.batch, base, args.kv_dtype, args.state_dtype)
    if args.plot:
        memory.plot_memory(cfg, name, base, base_name, args.plot, max(args.context), args.batch[0],
                           args.kv_dtype, args.state_dtype, log=args.log)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    gib = 1024**3
    print(f"{name}: {cfg.num_layers} layers {cfg.layer_types}; kv {args.kv_dtype}, "
          f"state {args.state_dtype or cfg.state_dtype}; baseline: {base_name}")
    print(f"{'context':>9} {'batch':>5} {'KV GiB':>9} {'state GiB':>9} {'total GiB':>9} "
          f"{'baseline':>9} {'reduction':>9} {'prefill PFLOP':>13} {'n^2 share':>9} {'decode GB/tok':>13}")
    for r in rows:
        f = r["prefill_flops"]
        print(f"{r['context']:>9,} {r['batch']:>5} {r['kv_bytes'] / gib:>9.3f} {r['state_bytes'] / gib:>9.3f} "
              f"{r['total_bytes'] / gib:>9.3f} {r['baseline_total_bytes'] / gib:>9.3f} {r['reduction']:>9.1%} "
              f"{f['total'] / 1e15:>13.3f} {f['quadratic'] / f['total']:>9.1%} "
              f"{r['decode_bytes_per_token']['total'] / 1e9:>13.3f}")
    last = rows[-1]
    print(f"by layer type at {last['context']:,} tokens, batch {last['batch']}: " + ", ".join(
        f"{LAYER_LETTERS[c]} x{cfg.layer_types.count(c)} {b / gib:.3f} GiB" for c, b in last["by_type"].items()))
    cross = rows[0]["crossover_context"]
    print(f"crossover: the cache falls below the baseline's from {cross:,} tokens" if cross else
          "crossover: the cache never falls below the baseline's")
    print(memory.n2_tax_line(cfg, max(args.context), args.cap, args.batch[0], args.kv_dtype, args.state_dtype))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


# --------------------------------------------------------------------------- calculator
def _add_calculator(sub) -> None:
    p = sub.add_parser("calculator", help="serve the interactive cache-memory calculator page locally",
                       description="Serve the calculator page (hybridlm/web) on localhost and print its address.")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1; 0 picks a free one (default: %(default)s)")
    p.add_argument("--no-browser", action="store_true", help="do not open a web browser")


def _cmd_calculator(args) -> int:
    from hybridlm.calculator import serve

    serve(args.port, open_browser=not args.no_browser)
    return 0


# --------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a synthetic task or a text file",
                       description="Train a preset (with optional overrides) on a recall task or, with --text, "
                                   "byte-level on a text file. Runs data-parallel under torchrun. "
                                   "Checkpoints go to --out; --resume continues the newest one exactly.")
    p.add_argument("--preset", default="tiny-hybrid-3to1", help="model preset (default: %(default)s)")
    p.add_argument("--pattern", default=None, help="override the layer pattern, e.g. GGGA")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--hidden", type=int, default=None, help="override hidden_size")
    p.add_argument("--task", default="mqar", help="mqar | copy | needle | multihop (default: %(default)s)")
    p.add_argument("--text", default=None, help="train byte-level on this text file instead of a task")
    p.add_argument("--task-vocab", type=int, default=64, help="token ids the task uses (default: %(default)s)")
    p.add_argument("--pairs", type=int, default=8, help="mqar: key-value pairs (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="mqar/needle/text: sequence length")
    p.add_argument("--length", type=int, default=16, help="copy: string length (default: %(default)s)")
    p.add_argument("--hops", type=int, default=2, help="multihop: hops per chain (default: %(default)s)")
    p.add_argument("--chains", type=int, default=2, help="multihop: chains (default: %(default)s)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per rank and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, 0 = off (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: at the end)")
    p.add_argument("--eval-batches", type=int, default=4, help="test batches per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data (default: %(default)s)")
    p.add_argument("--out", default=None, help="run directory (default: runs/train-<task>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _cmd_train(args) -> int:
    import torch

    from hybridlm.config import HybridConfig
    from hybridlm.model import HybridLM
    from hybridlm.tasks import ByteText, make_task
    from hybridlm.train import TrainConfig, init_distributed, train, write_summary

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.text:
        data = ByteText(args.text, seq_len=args.seq_len or 128)
    else:
        data = make_task(args.task, args.task_vocab, seq_len=args.seq_len, num_pairs=args.pairs,
                         length=args.length, hops=args.hops, num_chains=args.chains)
    overrides = {k: v for k, v in (("layer_pattern", args.pattern), ("num_layers", args.layers),
                                   ("hidden_size", args.hidden)) if v is not None}
    config = HybridConfig.preset(args.preset, vocab_size=data.vocab_size, **overrides)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                      warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=args.clip,
                      eval_every=args.eval_every, eval_batches=args.eval_batches,
                      checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, seed=args.seed)
    rank, world, device = init_distributed()
    torch.manual_seed(args.seed)
    model = HybridLM(config).to(device)
    out = args.out or f"runs/train-{'text' if args.text else args.task}"
    meta = {"model": config.to_dict(), "data": repr(data)}
    result = train(model, data, cfg, out_dir=out, resume=args.resume, stop_after=args.stop_after, meta=meta)
    if rank == 0:
        write_summary(f"{out}/summary.json", result, {"world_size": world, **meta})
        last = result.evals[-1] if result.evals else None
        if last is not None:
            print(f"test loss {last['loss']:.4f}  accuracy {last['accuracy']:.3f}  (step {last['step']})")
        print(f"{len(result.losses)} steps, {result.tokens_per_s:,.0f} tokens/s; checkpoints in {out}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


# --------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    from hybridlm.bench import add_kernel_arguments

    p = sub.add_parser("bench", help="kernel benchmarks against the reference and peers (GPU)",
                       description="Check every Triton kernel against the reference, then time it against "
                                   "flash-linear-attention, torch SDPA and the reference on one GPU.")
    p.add_argument("suite", choices=["kernels"], help="what to benchmark")
    add_kernel_arguments(p)


def _cmd_bench(args) -> int:
    from hybridlm.bench.kernels import run

    return run(args)


# --------------------------------------------------------------------------- study
def _add_study(sub) -> None:
    p = sub.add_parser("study", help="train attention, linear and hybrid models of equal size; report recall vs memory",
                       description="The trade-off study: trains models of (near) equal parameter count for several "
                                   "layer patterns on multi-query associative recall, measures recall as pairs and "
                                   "length grow past training, cache bytes and decode speed, and writes "
                                   "runs/<name>/report.md with plots and results.json. The default finishes in "
                                   "minutes on a laptop CPU; --scale gpu is sized for one GPU in under 30 "
                                   "minutes (about 17 on an H200).")
    p.add_argument("--scale", choices=("cpu", "gpu"), default="cpu", help="preset size (default: %(default)s)")
    p.add_argument("--task", choices=("mqar", "multihop", "copy"), default=None,
                   help="what to train and test on (default mqar); --train-pairs / --eval-pairs then count "
                        "key-value pairs (mqar), chains (multihop) or tokens to copy (copy)")
    p.add_argument("--hops", type=int, default=None, help="multihop: copies after each chain's first assignment (2)")
    p.add_argument("--name", default=None, help="run name; output in runs/<name> (default: study or study-gpu)")
    p.add_argument("--out", default=None, help="output directory (overrides runs/<name>)")
    p.add_argument("--patterns", default=None, help="comma-separated layer patterns (default cpu: A,G,GGGA,X,D; gpu adds GGGGGGGA)")
    p.add_argument("--ratios", type=parse_int_list, default=None,
                   help="also sweep the hybrid ratio: r adds the pattern of r G layers then one A, e.g. 1,3,7")
    p.add_argument("--gate-init", action="append", default=None, metavar="NAME=A_LO:A_HI:DT_LO:DT_HI",
                   help="also train every G-containing pattern with this decay init (repeatable), "
                        "e.g. slow=0.1:1:0.0001:0.001 (default init: A in [1, 16], dt in [0.001, 0.1])")
    p.add_argument("--layers", type=int, default=None, help="layers of every model (default: longest pattern)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size of every model")
    p.add_argument("--key-dim", type=int, default=None,
                   help="key dim of each linear head: sets the recurrent state's size (default cpu: 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model")
    p.add_argument("--batch-size", type=int, default=None, help="training sequences per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--train-len", type=int, default=None, help="training sequence length")
    p.add_argument("--vocab", type=int, default=None, help="token ids of the task (keys and values from two halves)")
    p.add_argument("--train-pairs", type=parse_int_list, default=None,
                   help="sizes trained on (pairs, chains or copy lengths: see --task), e.g. 2,4,8")
    p.add_argument("--eval-pairs", type=parse_int_list, default=None, help="sizes evaluated (see --task)")
    p.add_argument("--eval-lens", type=parse_int_list, default=None, help="sequence lengths evaluated")
    p.add_argument("--eval-len-pairs", type=int, default=None, help="pairs in the length sweep")
    p.add_argument("--eval-batches", type=int, default=None, help="test batches per evaluation point")
    p.add_argument("--cache-contexts", type=parse_size_list, default=None, help="contexts for cache bytes, e.g. 4k,64k")
    p.add_argument("--decode-context", type=parse_size, default=None, help="prompt length before timing decode")
    p.add_argument("--seed", type=int, default=None, help="seed of weights and data")
    p.add_argument("--token-shift", choices=("layers", "noconv", "all", "none"), default=None,
                   help="which models get a previous-token embedding (default layers: every model with a layer "
                        "that has no short conv; noconv: only models with no conv at all; see "
                        "hybridlm.study.uses_token_shift)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no model that would end past this many minutes; the report covers the models "
                        "done and lists the rest as skipped (default cpu: none; gpu: 28)")
    p.add_argument("--jobs", type=int, default=None, help="models trained at once on CPU (default: 2 on 2+ cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: cores / jobs)")


def _cmd_study(args) -> int:
    import dataclasses
    import time

    from hybridlm.study import SCALES, GateInit
    from hybridlm.study_run import run_study

    t0 = time.perf_counter()
    sc = SCALES[args.scale]
    patterns = list(sc.patterns) if args.patterns is None else [p.strip() for p in args.patterns.split(",") if p.strip()]
    patterns += ["G" * r + "A" for r in (args.ratios or []) if "G" * r + "A" not in patterns]
    overrides = {
        "patterns": tuple(patterns),
        "name": args.name or ("study" if args.scale == "cpu" else "study-gpu"),
        "gate_inits": tuple(GateInit.parse(t) for t in (args.gate_init or [])),
    }
    for field, value in (("task", args.task), ("hops", args.hops), ("num_layers", args.layers),
                         ("hidden_size", args.hidden), ("linear_key_dim", args.key_dim), ("steps", args.steps),
                         ("batch_size", args.batch_size), ("lr", args.lr), ("train_len", args.train_len), ("vocab_size", args.vocab),
                         ("train_pairs", args.train_pairs), ("eval_pairs", args.eval_pairs),
                         ("eval_lens", args.eval_lens), ("eval_len_pairs", args.eval_len_pairs),
                         ("eval_batches", args.eval_batches), ("cache_contexts", args.cache_contexts),
                         ("decode_context", args.decode_context),
                         ("seed", args.seed), ("jobs", args.jobs), ("threads", args.threads),
                         ("token_shift", args.token_shift), ("max_minutes", args.max_minutes)):
        if value is not None:
            overrides[field] = tuple(value) if isinstance(value, list) else value
    sc = dataclasses.replace(sc, **overrides)
    out = args.out or f"runs/{sc.name}"
    run_study(sc, out)
    print(f"study finished in {time.perf_counter() - t0:.0f} s; report: {out}/report.md")
    return 0


# --------------------------------------------------------------------------- profile
def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="TTFT, decode tokens/s and peak memory across context lengths",
                       description="Build a preset with random weights (layer and expert counts cut to fit), prefill "
                                   "random prompts in chunks, time the first token and greedy decoding, and report "
                                   "peak and cache memory, the bandwidth-bound tokens/s (measured copy bandwidth) "
                                   "and the largest batch that fits, against the all-attention twin (or --vs).")
    p.add_argument("--preset", default="tiny-qwen3-next", help="preset name (default: %(default)s)")
    p.add_argument("--vs", metavar="PRESET", help="compare against this preset instead of the all-attention twin")
    p.add_argument("--no-twin", action="store_true", help="profile the preset alone")
    p.add_argument("--layers", type=int, help="number of layers (the pattern is tiled); default: the preset's")
    p.add_argument("--experts", type=int, help="routed experts per MoE layer; default: the preset's")
    p.add_argument("--contexts", type=parse_size_list, default=[4096, 32768, 131072],
                   help="prompt lengths, e.g. 4k,32k,128k,1m (default: %(default)s)")
    p.add_argument("--batch", type=parse_int_list, default=[1], help="batch sizes, e.g. 1,8 (default: %(default)s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                   help="weights, KV and conv windows (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--decode-steps", type=int, default=32, help="greedy tokens timed per row (default: %(default)s)")
    p.add_argument("--prefill-chunk", type=parse_size, default=None,
                   help="tokens of each prompt per prefill call (default: 16k tokens a call on cuda, 2k on cpu, "
                        "split over the batch; on cpu each attention call holds chunk x context score bytes, "
                        "see docs/profile/README.md)")
    p.add_argument("--max-batch-search", action="store_true",
                   help="also find the largest batch by allocating it (CUDA only)")
    p.add_argument("--at-max-batch", action="store_true",
                   help="also measure each context at the largest batch that fits (on cpu needs --memory-budget)")
    p.add_argument("--memory-budget", type=parse_size,
                   help="bytes the caches may take, e.g. 40g (default: free device memory after loading the model)")
    p.add_argument("--transformers", action="store_true",
                   help="also time transformers' generate on the same weights (needs a model type that holds them)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through a CUDA graph of the fixed-shape step (default: on cuda when the layers "
                        "allow it; --no-graph times the eager step)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step before the CUDA graph captures it (fewer, fused kernels; "
                        "compiling takes minutes at 48 layers)")
    p.add_argument("--fill", action="store_true",
                   help="skip the prefill: fill the cache with random keys, values and states and time decoding only "
                        "(no TTFT; for large batches at long contexts, whose prefill takes minutes)")
    p.add_argument("--prefill-repeats", type=int, default=1, metavar="N",
                   help="prefill each prompt N times and report the median time to first token (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--plot", metavar="PNG", help="write decode tokens/s and cache bytes vs context")
    p.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")


def _cmd_profile(args) -> int:
    import torch

    from hybridlm import memory
    from hybridlm.profile import ProfileSettings, profile_models, scaled_config
    from hybridlm.profile_report import format_table, plot_profile

    if not args.batch or any(b <= 0 for b in args.batch):
        raise ValueError(f"--batch: expected positive integers, got {args.batch}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    for flag, value in (("--layers", args.layers), ("--experts", args.experts), ("--decode-steps", args.decode_steps)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected an int >= 1, got {value}")
    settings = ProfileSettings(device=device, dtype=dtype, decode_steps=args.decode_steps,
                               prefill_chunk=args.prefill_chunk, seed=args.seed, memory_budget=args.memory_budget,
                               graph=args.graph, fill=args.fill, compile=args.compile,
                               prefill_repeats=args.prefill_repeats)
    cfg = scaled_config(args.preset, args.layers, args.experts)
    models = {args.preset: cfg}
    if args.vs:
        models[args.vs] = scaled_config(args.vs, args.layers)
    elif not args.no_twin:
        models[f"{args.preset} twin"] = memory.attention_twin(cfg)
    rows = profile_models(models, args.contexts, args.batch, settings, args.max_batch_search, args.transformers,
                          args.at_max_batch)
    if args.plot:
        plot_profile(rows, args.plot)
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0


# --------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridlm",
        description="Build, train, run and measure linear-attention hybrid language models.",
    )
    from hybridlm import __version__

    parser.add_argument("--version", action="version", version=f"hybridlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name, (add, _) in COMMANDS.items():
        add(sub)
    return parser


COMMANDS = {
    "info": (_add_info, _cmd_info),
    "generate": (_add_generate, _cmd_generate),
    "convert": (_add_convert, _cmd_convert),
    "train": (_add_train, _cmd_train),
    "study": (_add_study, _cmd_study),
    "memory": (_add_memory, _cmd_memory),
    "calculator": (_add_calculator, _cmd_calculator),
    "bench": (_add_bench, _cmd_bench),
    "profile": (_add_profile, _cmd_profile),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][1](args) or 0
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"hybridlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
