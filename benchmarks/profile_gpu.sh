#!/usr/bin/env bash
# The GPU profile behind docs/profile/: Qwen3-Next-80B-A3B's layer dimensions with 32 routed experts
# (7.2B parameters, random weights, bf16) against its all-attention twin, on one GPU.
#   bash benchmarks/profile_gpu.sh OUT_DIR [EXTRA PROFILE FLAGS]   (about 8 minutes on an H200)
#   e.g. bash benchmarks/profile_gpu.sh out --compile   (torch.compile the decode step before capture;
#        compiling 48 layers adds minutes per row set)
# 1. GPU checks of the decode path (CUDA graph == eager, decode attention and MoE kernels vs reference);
# 2. real chunked prefill + graphed decode at 4k, 32k, 128k, batch 1 (TTFT, decode tokens/s);
# 3. decode on filled caches at 128k, 512k and 1M, batch 1 and the largest batch that fits;
# 4. transformers' generate on the same weights (Qwen3NextForCausalLM), 4k, batch 1.
set -euo pipefail
out=${1:?usage: bash benchmarks/profile_gpu.sh OUT_DIR [EXTRA PROFILE FLAGS]}
shift
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run="python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --decode-steps 64 $*"
python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py tests/ops/test_decode_attention.py \
    tests/ops/test_moe_decode.py -k "cuda or gpu or GPU" 2>&1 | tail -5
$run --contexts 4k,32k,128k --batch 1 --plot "$out/prefill.png" --json > "$out/prefill.json"
$run --contexts 128k,512k,1m --batch 1 --fill --at-max-batch --plot "$out/decode.png" --json > "$out/decode.json"
$run --contexts 4k --batch 1 --no-twin --transformers --decode-steps 16 --prefill-repeats 3 --json > "$out/transformers.json"
python3 -m hybridlm.profile_report "$out"/prefill.json "$out"/decode.json "$out"/transformers.json | tee "$out/table.txt"
