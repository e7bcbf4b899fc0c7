#!/usr/bin/env bash
# The GPU profile behind docs/profile/: Qwen3-Next-80B-A3B's layer dimensions with 32 routed experts
# (7.2B parameters, random weights, bf16) against its all-attention twin, on one GPU.
#   bash benchmarks/profile_gpu.sh OUT_DIR [EXTRA PROFILE FLAGS]   (about 8 minutes on an H200)
#   e.g. bash benchmarks/profile_gpu.sh out --compile   (torch.compile the decode step before capture;
#        compiling 48 layers adds about a minute per row)
#   PARTS="prefill" bash benchmarks/profile_gpu.sh out --compile   (only some parts, e.g. to fit a
#        10-minute device call; the table at the end reads whichever JSON files OUT_DIR holds)
# Parts (PARTS, default all, in this order):
#   checks       GPU checks of the decode path (CUDA graph == eager, decode attention and MoE kernels vs reference);
#   prefill      real chunked prefill (median of 3) + graphed decode at 4k, 32k, 128k, batch 1 (TTFT, decode tokens/s);
#   decode       decode on filled caches at 128k, 512k and 1M, batch 1 and the largest batch that fits;
#   transformers transformers' generate on the same weights (Qwen3NextForCausalLM), 4k, batch 1, beside ours.
set -euo pipefail
out=${1:?usage: bash benchmarks/profile_gpu.sh OUT_DIR [EXTRA PROFILE FLAGS]}
shift
parts=${PARTS:-"checks prefill decode transformers"}
for part in $parts; do
    case $part in checks|prefill|decode|transformers) ;; *) echo "PARTS: unknown part '$part' (expected checks, prefill, decode, transformers)" >&2; exit 2;; esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run="python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --decode-steps 64 $*"
has() { [[ " $parts " == *" $1 "* ]]; }
if has checks; then
    python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py tests/ops/test_decode_attention.py \
        tests/ops/test_moe_decode.py -k "cuda or gpu or GPU" 2>&1 | tail -5
fi
if has prefill; then
    $run --contexts 4k,32k,128k --batch 1 --prefill-repeats 3 --plot "$out/prefill.png" --json > "$out/prefill.json"
fi
if has decode; then
    $run --contexts 128k,512k,1m --batch 1 --fill --at-max-batch --plot "$out/decode.png" --json > "$out/decode.json"
fi
if has transformers; then
    $run --contexts 4k --batch 1 --no-twin --transformers --decode-steps 16 --prefill-repeats 3 --json \
        > "$out/transformers.json"
fi
rows=("$out"/prefill.json "$out"/decode.json "$out"/transformers.json)
existing=()
for f in "${rows[@]}"; do [[ -s $f ]] && existing+=("$f"); done
if (( ${#existing[@]} )); then
    python3 -m hybridlm.profile_report "${existing[@]}" | tee "$out/table.txt"
fi
