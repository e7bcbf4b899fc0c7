#!/usr/bin/env bash
# What the next GPU session measures (after the sixth 2026-12-02 session; see RESULTS.md there).
# Each part fits one 10-minute device call; every output lands in OUT_DIR (JSON and logs).
#   bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART
# (the device tool: PYTHONPATH=src, plus fla 0.6.0's wheels for the `kernels` part)
# Parts:
#   tests     the short-conv, RMSNorm and static-decode GPU tests, then the chunked op's bf16, packed
#             and compile tests; the conv kernel's window barrier is untested on a GPU
#   kernels   the whole kernel suite (`bench kernels`) with the two-kernel backward and the capped
#             prep: the H 16 rows and the decode and long sections were not rerun with them
#   prefill   TTFT at 4k and 32k and the 4-layer prefill trace (0.202 s / 1.73 s in the sixth session),
#             now with the host's table: which ops take the CPU time of the still host-bound prefill
#   compiled  the compiled largest-batch and long-context rows still owed in docs/profile
set -euo pipefail
out=${1:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART}
part=${2:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
case $part in
    kernels)
        python3 benchmarks/kernels.py --max-minutes 8 --json "$out/kernels.json" --out "$out" 2>&1 | tee "$out/kernels.log"
        ;;
    prefill)
        python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --contexts 4k,32k --batch 1 \
            --no-twin --decode-steps 16 --prefill-repeats 3 --json > "$out/profile.json"
        python3 -m hybridlm.profile_report "$out/profile.json" | tee "$out/profile.txt"
        python3 benchmarks/step_trace.py --preset qwen3-next-80b-a3b --layers 4 --experts 32 --context 4096 \
            --batch 1 --top 15 --json "$out/trace.json" 2>&1 | grep -v "^USDT" | tee "$out/trace.txt"
        ;;
    tests)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_conv.py \
            tests/ops/test_triton_norm.py tests/test_static_decode.py 2>&1 | tail -3 | tee "$out/tests_layers.txt"
        python3 -m pytest -x -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_chunk.py \
            -k "bfloat16 or compiles or packed" 2>&1 | tail -3 | tee "$out/tests_chunk.txt"
        ;;
    compiled)
        PARTS="checks prefill" bash benchmarks/profile_gpu.sh "$out" --compile 2>&1 | tee "$out/compiled.log"
        ;;
    *)
        echo "PART: unknown '$part' (expected tests, kernels, prefill, compiled)" >&2
        exit 2
        ;;
esac
