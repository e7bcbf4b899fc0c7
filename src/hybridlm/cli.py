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
    p = sub.add_parser("generate", help="continue a prompt of token ids with a (random-weight) preset",
                       description="Build a preset with seeded random weights and print the ids it generates "
                                   "after --prompt-ids (prefill, then one token at a time through the cache).")
    p.add_argument("--preset", default="tiny-hybrid-3to1", help="preset name (default: %(default)s)")
    p.add_argument("--prompt-ids", type=parse_int_list, required=True, help='token ids, e.g. "1 2 3"')
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the sampler (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")


def _cmd_generate(args) -> int:
    import torch

    from hybridlm.config import HybridConfig
    from hybridlm.generate import generate
    from hybridlm.model import HybridLM

    torch.manual_seed(args.seed)
    model = HybridLM(HybridConfig.preset(args.preset)).eval()
    generator = torch.Generator().manual_seed(args.seed)
    new = generate(model, [args.prompt_ids], args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, generator=generator)
    print(" ".join(str(t) for t in new[0].tolist()))
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
