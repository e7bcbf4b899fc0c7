#!/usr/bin/env bash
# The changes committed after the fifth 2026-12-02 session's device calls, measured on one GPU.
# Each part fits one 10-minute device call; every output lands in OUT_DIR (JSON and logs).
#   bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART
# (the device tool: PYTHONPATH=src, and for `prep` BASE_PREP=<0e55bd0's chunk_prep.py> carried along)
# Parts:
#   prep      the reordered prep (42db7de) against 0e55bd0's, and with register caps 168 / 128;
#             the state pass at 2 stages (two programs per multiprocessor) with BV 16 and 32
#             (forward_ab.py; also times the op forward and fla 0.6.0's when importable)
#   local     the chunk-local backward split (77da1d3) beside the one kernel (chunk_parts.py,
#             Qwen3-Next heads, B 4, T 16k; each launch checked against the default first)
#   prefill   TTFT at 4k and 32k with the padded MoE stack (e70df42), the gather combine
#             (c4b993c), the cheaper pack checks (316322f) and the Triton RMSNorm, and the
#             4-layer prefill trace
#   tests     the Triton RMSNorm's and the chunked op's GPU tests, bf16 and packed (about 4 minutes)
set -euo pipefail
out=${1:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART}
part=${2:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case $part in
    prep)
        # BASE_PREP: 0e55bd0's chunk_prep.py, written beforehand where the device's copy has no .git
        base=${BASE_PREP:-$out/chunk_prep_0e55bd0.py}
        [[ -s $base ]] || git show 0e55bd0:src/hybridlm/ops/triton/chunk_prep.py > "$base"
        python3 benchmarks/experiments/forward_ab.py --baseline-prep "$base" \
            --maxnreg 168,128 --state-configs 16:2,32:2 --json "$out/forward_ab.json" 2>&1 | tee "$out/forward_ab.log"
        ;;
    local)
        python3 benchmarks/chunk_parts.py --shapes qwen --json "$out/chunk_parts.json" 2>&1 | tee "$out/chunk_parts.log"
        ;;
    prefill)
        python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --contexts 4k,32k --batch 1 \
            --no-twin --decode-steps 16 --prefill-repeats 3 --json > "$out/profile.json"
        python3 -m hybridlm.profile_report "$out/profile.json" | tee "$out/profile.txt"
        python3 benchmarks/step_trace.py --preset qwen3-next-80b-a3b --layers 4 --experts 32 --context 4096 \
            --batch 1 --json "$out/trace.json" 2>&1 | grep -A12 "prefill of" | tee "$out/trace.txt"
        ;;
    tests)
        python3 -m pytest -x -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_norm.py \
            tests/ops/test_triton_chunk.py -k "bfloat16 or compiles or packed or split or norm" 2>&1 | tail -5 \
            | tee "$out/tests.txt"
        ;;
    *)
        echo "PART: unknown '$part' (expected prep, local, prefill, tests)" >&2
        exit 2
        ;;
esac
