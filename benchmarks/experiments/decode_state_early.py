"""The Gated DeltaNet decode step reading its state before the PDL wait (``state_settled=True``)
against the default (state read after the wait), as CUDA-graph replays of consecutive steps over
distinct state buffers (>= 4x L2), Qwen3-Next's heads (HV 32, K = V = 128, bf16 inputs).

Each graph holds every buffer once, so no step reads a state another step of the same replay writes,
and replays are stream-ordered: the promise ``state_settled`` makes holds. First the two forms are
checked against each other on one replay from the same states (bit-identical outputs and states),
then timed; the share is of the 1 GiB device-to-device copy rate, as ``hybridlm bench kernels``.

    python benchmarks/experiments/decode_state_early.py --batches 1,8,32,64,128 --json out.json
"""

from __future__ import annotations

import argparse
import json

import torch

from hybridlm.bench import timing
from hybridlm.ops.triton.decode import fused_recurrent_gated_delta_rule_step as step

H, HV, D = 16, 32, 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    rate = timing.copy_bytes_per_s(dev)
    rows = []
    print(f"copy rate {rate / 1e9:.1f} GB/s")
    print(f"{'batch':>5} {'default us':>11} {'settled us':>11} {'default %':>10} {'settled %':>10} {'same-size copy us':>18}")
    for B in (int(b) for b in args.batches.split(",")):
        torch.manual_seed(B)
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn_like(q)
        v = torch.randn(B, HV, D, device=dev, dtype=torch.bfloat16)
        g = torch.nn.functional.logsigmoid(torch.randn(B, HV, device=dev) + 3.0)
        beta = torch.rand(B, HV, device=dev)
        states = timing.distinct_states(B, HV, D, D, dev)
        outs = [torch.empty(B, HV, D, device=dev, dtype=torch.bfloat16) for _ in states]
        start = [s.clone() for s in states]

        def calls(settled):
            def one(i):
                o, _ = step(q, k, v, g, beta, states[i], use_qk_l2norm=True, inplace=True, state_settled=settled)
                outs[i].copy_(o)  # kept for the check (a plain launch: only in the check's graphs)
            return [lambda i=i: one(i) for i in range(len(states))]

        # the check: one replay of each form from the same states
        got = []
        for settled in (False, True):
            graph = timing.capture_graph(calls(settled))
            for s, s0 in zip(states, start):
                s.copy_(s0)
            graph.replay()
            torch.cuda.synchronize()
            got.append(([o.clone() for o in outs], [s.clone() for s in states]))
            del graph
        same = all(torch.equal(a, b) for a, b in zip(got[0][0] + got[0][1], got[1][0] + got[1][1]))
        # the timing: the step alone (no copy of o between steps)
        us = {}
        for settled in (False, True):
            c = [lambda s=s, settled=settled: step(q, k, v, g, beta, s, use_qk_l2norm=True, inplace=True,
                                                    state_settled=settled) for s in states]
            us[settled] = timing.graphed_ms_per_call(c) * 1e3
        dst = [torch.empty_like(s) for s in states]
        copy_us = timing.graphed_ms_per_call([lambda a=a, b=b: a.copy_(b) for a, b in zip(dst, states)]) * 1e3
        nbytes = timing.decode_state_bytes(B, HV, D, D)
        share = {s: nbytes / (us[s] * 1e-6) / rate for s in us}
        rows.append(dict(batch=B, default_us=us[False], settled_us=us[True], default_share=share[False],
                         settled_share=share[True], same_size_copy_us=copy_us, identical=same,
                         copy_rate_bytes_per_s=rate, buffers=len(states)))
        print(f"{B:>5} {us[False]:>11.2f} {us[True]:>11.2f} {100 * share[False]:>9.1f}% {100 * share[True]:>9.1f}% "
              f"{copy_us:>18.2f}  {'identical' if same else 'DIFFERENT'}", flush=True)
        del states, start, dst, got
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
