#!/usr/bin/env bash
# What the next GPU session measures (kept current after each session; see RESULTS.md).
# Each part fits one 10-minute device call; every output lands in OUT_DIR (JSON and logs).
#   bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART [PART ...]
# Several parts run one after another in one call. The device machine is handed back ~30 s after a
# call ends and the next call starts a fresh one (~90-120 s of the session's 30 device-minutes in the
# second 12-03 session; ~200 s for the third session's last call), so group parts that fit 10 minutes
# together, e.g. `moedense pdl gemv` (~1 + ~1 + ~3.5 minutes). In the third 12-03 session 8 of 10 files
# under OUT came back (the other two "left out (count)"): tar the folder into one file. In the fifth
# 12-03 session four of seven calls got no machine, each refusal costing ~100-120 s of device time
# and locking calls out for ~10 minutes: put the most important part first.
# (the device tool: PYTHONPATH=src, plus fla 0.6.0's wheels for the `kernels` part)
# Next, in this order (after the second 2026-12-06 session: MoE's input norm inside its stacked product by
# default, 4k batch-1 compiled 69.9-71.3% of the bound in nine rows on three H100 starts, median 70.5%; the
# 128k rows and docs/profile's plot rerun with it): on an H200 `half` then `kernels` (the float16 WY inverse is
# untimed there); the fused MoE kernel at 512 experts; `gemv` against cuBLAS with the new kernel arguments.
# Parts:
#   h100run      docs/profile's H100 run (compiled 4k batch-1 row, 128k vs the twin, transformers, the plot) and
#                the static decoder's compiled/sampling/graph GPU tests (second 12-06 session, 238 s)
#   normfused    the batch-1 input norm inside the product after it against the add + norm kernel, in the
#                compiled 4k batch-1 step (second 12-06 session: +1.3%), then the GPU tests
#   greedy       the greedy kernel and 2-4 preloaded gemv pieces in the compiled 4k batch-1 step (first 12-06 session,
#                454 s on an H100 with a 120 s test limit that stopped the tests at 79 passed; now 300 s)
#   blockwide    the compiled 4k batch-1 step with the wide input projections on the block kernel (now PDL)
#                against cuBLAS, and the matrix-vector kernel's GPU tests
#   (preload, third 12-05 session, reverted: `git checkout c513ab3` and its pending_gpu.sh rerun it)
#   order        the compiled 4k batch-1 step with five choices of wait-first kernels (HYBRIDLM_PDL_WAIT_FIRST;
#                third 12-05 session, H100: 271.7-273.4 tokens/s for all, within noise) and moe_lookahead.py's
#                order combinations of the MoE chain
#   fused        the fused MoE decode kernel and the conv in the GDN decode kernel (new 2026-12-05, second
#                session): moe_fused_ab.py, the compiled 4k batch-1 step with neither / both / MoE only, the
#                GPU tests
#   tma          decode_tma.py: the decode step's state through TMA descriptors (load, store, both) against
#                the step, torch's copy and Triton's flat scale at batch 32 / 64 (new 2026-12-04, second session)
#   kernels      the whole kernel suite (`bench kernels`; H200 2026-12-04, 361 s with fla's wheels:
#                fwd 1.83x fla at Qwen3-Next B 1 T 32k, decode 88.3% at batch 32, 4.3 us at batch 1;
#                H100 2026-12-05 with the float16 inverse, --max-minutes 6.5, 339 s: 2.02x, 92.0%,
#                3.3 us), after any kernel change
#   half         forward_ab.py --half-inverse: the prep's inverse on float16 against tf32 operands, and
#                the chunked op's bf16/fp16/packed/compile GPU tests (H100 2026-12-05, 497 s with the
#                machine's start: prep 0.578 -> 0.447 ms, op 1.291 -> 1.160, 19 passed)
#   h100profile  #7's targets on an H100: transformers at 4k batch 1 (compiled), 128k against the twin at
#                the largest batches, the compiled 128k row at 90% of the largest batch
#   transformers the compiled step and transformers' generate at 4k, batch 1, in one call (2026-12-04,
#                93 s: 316.6 vs 4.82 tokens/s, 65.7x)
#   compiled     the compiled step at the largest batches of 512k and 1M (128k: 72.6% of the bound at
#                batch 36, seventh session)
#   attn128      the decode-attention launch sweep at head dim 128 (8 query heads, 1 and 8 key/value
#                heads), its default and the no-pipeline launch
#   attn8_1      the full launch sweep (stages, block, warps, 2-16 programs per SM) as graph replays at
#                head dim 128 with one key/value head, B 1, S 128k and B 8, S 32k: the default reads
#                46% / 64% of the copy rate there (2026-12-03, after the column-split combine) with
#                1024 / 128 splits of 2 blocks each; whether fewer, longer splits win is untested
#                (the s8 sweep that suggested 528 was timed eagerly, host-bound at these sizes)
#   forward      forward_ab.py: the chunked forward's parts at Qwen3-Next heads, B 1, T 32k (third 12-03
#                session: prep 0.577 ms, state pass 0.759, op 1.335, fla 2.070), fla's when its wheels
#                are carried
#   gemv         the decode matrix-vector kernel against cuBLAS, then the compiled 48-layer profile and the
#                4-layer kernel table at 4k, batch 1 (third 12-03 session: 254.4 tokens/s, 44.0% of the
#                bound; 452.8 us of kernels in 85 launches for 4 layers)
#   decode       the decode-step sweep at batch 32 and 64, pipelined persistent launches included (third
#                12-03 session: default 87.6% / 91.6%, pipelined 82.1% / 86.4%)
#   moedense     the batched static MoE path's down product in three layouts: one GEMM over [E F, D]
#                (before the third 12-03 session), the batched product + sum over [E, D, F] (third), one
#                GEMM over [D, E F] (the layer since the fourth: 23.3-23.9 us a layer at 8-64 tokens)
#   pdl          pdl_chain.py: 48 chained batch-1 matrix-vector products as one graph, with and without
#                programmatic dependent launch (fourth 12-03 session: 6.53 -> 6.46 us a kernel, 1%)
#   l2           l2_prefetch.py: whether prefetching a weight's first MB into L2 during the small
#                kernels before its product pays (fourth 12-03 session: slower in every variant)
#   views        after the decode step read q/k/v/g/beta as row views and beta as its logit, and the
#                gated norm became one custom op under compile (fourth 12-03 session, not yet timed): the
#                decode-step, norm and static-decode GPU tests, the 4k batch-1
#                profile and 4-layer trace (is the per-layer copy-and-sigmoid kernel gone? 274.4 tokens/s,
#                77 launches before), and the decode sweep at batch 32 / 64 (87.6% / 91.6% before)
#   recheck      the 4k batch-1 row with five prefills (the fifth 12-03 session's TTFTs were single
#                prefills: 0.108-0.179 s for unchanged prefill code) and the 4k batch-8 compiled row
#                (1,122.6 tokens/s, 50.4% in the fourth 12-03 session), after the three launch cuts
#   pdl2         (ran in the seventh 12-03 session) programmatic dependent launch in every decode kernel with
#                the one-row matrix-vector kernel and the residual add + norm kernel it brings: GPU tests,
#                gemv_ab.py, the 4k batch-1 compiled profile with PDL (under a watchdog that prints the whole
#                Python stack: it stalled in inductor in the sixth session; it did not in the seventh: 317.1
#                tokens/s) and without (305.7), the 4-layer trace, and the model-free chain of two-output
#                custom ops on CUDA (no stall)
#   pdl3         (ran in the seventh 12-03 session) the batch-1 bf16 step test with and without PDL, the 128k
#                batch-36 compiled row with and without PDL (814.2 / 812.4 tokens/s), and the decode sweep
#                at batch 32 / 64 with and without PDL (88.4% / 91.7% against 87.0% / 91.0%)
#   stall        the 48-layer compiled step at 4k, batch 1, with the residual add + norm as its custom op
#                (profile_add_norm_op.py, under the watchdog), against the default compiled step and the
#                uncompiled graph step, one call. Without the fallbacks registered up front it stalled in
#                torch 2.11's inductor (sixth 12-03 and 12-04 sessions: str() of the op's argument IR for
#                a log line, ops/_inductor.py); registered since the 12-04 session. Ran in the second 12-04
#                session: 329.6 tokens/s against 319.0, no stall; the op is now the compiled default
#   pdlb1        the 4k batch-1 step, compiled and as the uncompiled graph, with the GDN decode kernel
#                launched without PDL (profile_decode_nopdl.py) and as by default: alone in a graph of
#                its own steps PDL costs it 1 us at batch 1 (4.32 vs 3.30 us, 12-04 session). Ran in the second
#                12-04 session (without PDL for that kernel: 311.7 / 315.9 against 318.9 / 325.1 tokens/s);
#                that kernel's chain in both PDL orders is the `order` part
#   graphpdl     (ran in the seventh 12-03 session: 323.3 tokens/s with PDL, 291.6 without) the uncompiled graph step at 4k, batch 1, with and without PDL: only there does the
#                static step take the residual add + norm kernel (RMSNorm.add; under compile inductor
#                fuses the add and norm itself). PDL became the default in the seventh 12-03 session on
#                compiled rows; this row is untimed with it (270.8 tokens/s, 47.0%, fifth session)
#   route        after the decode step's routing and the attention layers' q/k norm + rotary + cache write
#                each became one Triton kernel (fifth 12-03 session): their GPU tests with MoE decode and
#                static decode, moe_route_ab.py (the kernel against eager and
#                compiled PyTorch routing), the 4k batch-1 profile (compiled and the uncompiled graph) and
#                4-layer trace (281.9 tokens/s, 71 launches before)
#   layout       after the down stack moved to [D, E, I] storage (fourth 12-03 session): the MoE/static/
#                packing GPU tests (the grouped prefill product on CUDA included), moe_dense_ab.py (the
#                batched static path's one GEMM back), the sparse decode kernel on both down layouts at
#                32 experts, the 4k batch-1 profile and 4-layer trace, and the 128k batch-36 compiled row
#                (fourth 12-03 session: 126 passed; 274.4 tokens/s, 47.6%; 804.4 tokens/s, 71.6%)
#   tests        the chunked op's bf16 / packed / compile tests, decode attention, MoE decode, conv,
#                norm and static decode on the GPU (590 passed 2026-12-04 in ~8 min; rerun after kernel changes)
#   moe          the MoE decode loops' stages, default launch included, at 32 and 512 experts
#   attn         the decode-attention default launches at head dims 256 (16:2, twice in swapped order)
#                and 128 (8:8 and 8:1), now timed as CUDA-graph replays (eager timing was host-bound at
#                B 1, S 128k: 38% or 70% for one launch by the order it was timed in, 2026-12-03)
# Test lines end in "|| true" and keep their whole log (--tb=short; the seventh 12-03 session lost the
# reason two tests failed to a 12-line tail), printing its last 12 lines: a failing test must not stop the timing
# that follows in the same (scarce) device call (fifth 12-03 session: two failed tests ended the views
# part before its profile ran).
set -euo pipefail
out=${1:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART [PART ...]}
: "${2:?usage: bash benchmarks/experiments/pending_gpu.sh OUT_DIR PART [PART ...]}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run="python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --no-twin"
for part in "${@:2}"; do
case $part in
    h100run)
        # (second 12-06 session) docs/profile's H100 run with the current defaults (fused MoE input norm, greedy
        # kernel, two preloaded pieces): the compiled 4k batch-1 row, 128k against the twin at the largest
        # batches, transformers' generate at 4k, the README's plot; then the static decoder's GPU tests that the
        # earlier calls' time limits cut off (compiled, sampling, graphs, the fused norm)
        timeout 95 $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json \
            > "$out/compiled.json" || true
        timeout 120 python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --contexts 128k --batch 1 \
            --fill --at-max-batch --decode-steps 32 --json > "$out/twin.json" || true
        timeout 120 $run --contexts 4k --batch 1 --transformers --decode-steps 16 --prefill-repeats 1 --json \
            > "$out/transformers.json" || true
        python3 -m hybridlm.profile_report "$out/transformers.json" "$out/twin.json" "$out/compiled.json" \
            --plot "$out/h100.png" | tee "$out/h100_profile.txt" || true
        timeout 200 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/test_static_decode.py \
            -k "compiled or sampl or graph or batch1 or norm" --tb=short 2>&1 | tee "$out/tests_static.txt" | tail -5 || true
        ;;
    normfused)
        # (second 12-06 session) each batch-1 input norm inside the product after it (HYBRIDLM_NORM_FUSED: the
        # add + norm kernel gone), in the compiled 4k batch-1 step; "N:L" = the switch, HYBRIDLM_NORM_LAUNCH
        # (row-only, the default: MoE's stack on the one-row kernel; "BO,STAGES": the wide input stacks' block
        # kernel too, launched so). First call: 0 288.9 / 288.8 tokens/s, row-only 292.5, 4,3 286.7 / 286.9,
        # 8,3 286.6, 8,1 279.2. Now the two defaults alternated, then the GPU tests.
        i=0
        for v in 0:row-only 1:row-only 0:row-only 1:row-only 0:row-only 1:row-only; do
            i=$((i + 1))
            HYBRIDLM_NORM_FUSED=${v%%:*} HYBRIDLM_NORM_LAUNCH=${v#*:} timeout 95 $run --contexts 4k \
                --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/norm_${i}.json" || true
            python3 -m hybridlm.profile_report "$out/norm_${i}.json" | sed -n 2p | sed "s/^/$v /" \
                | tee -a "$out/norm_4k_b1.txt" || true
        done
        timeout 240 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_gemv.py \
            tests/test_static_decode.py tests/layers/test_norm_project.py --tb=short 2>&1 \
            | tee "$out/tests_norm.txt" | tail -5 || true
        ;;
    greedy)
        # (first 12-06 session) the greedy kernel (HYBRIDLM_GREEDY_KERNEL: argmax, token buffer, history and
        # slot in one launch) and the block kernel's row pieces preloaded before its PDL wait (HYBRIDLM_GEMV_PRELOAD,
        # now 0-4), in the compiled 4k batch-1 step; "PG" = preload, greedy kernel. The fourth 12-05 session had
        # 0 at 276.7-277.1 and 2 at 280.5 tokens/s. The greedy kernel's and the decoder's GPU tests first.
        timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_greedy.py \
            tests/test_static_decode.py --tb=short 2>&1 | tee "$out/tests_greedy.txt" | tail -5 || true
        i=0
        for pg in 20 21 41 21 20 41 31; do
            i=$((i + 1))
            HYBRIDLM_GEMV_PRELOAD=${pg:0:1} HYBRIDLM_GREEDY_KERNEL=${pg:1:1} timeout 95 $run --contexts 4k \
                --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/greedy_${i}_$pg.json" || true
            python3 -m hybridlm.profile_report "$out/greedy_${i}_$pg.json" | sed -n 2p | sed "s/^/$pg /" \
                | tee -a "$out/greedy_4k_b1.txt" || true
        done
        timeout 100 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_gemv.py --tb=short \
            2>&1 | tee "$out/tests_gemv.txt" | tail -5 || true
        ;;
    preload)
        # weights loaded before the PDL wait (fourth 12-05 session): the block matrix-vector kernel's first
        # row pieces (HYBRIDLM_GEMV_PRELOAD 0-2: the wide input projections at batch 1) and the down kernel's
        # shared-expert rows (HYBRIDLM_MOE_SHARED_PRELOAD), in the compiled 4k batch-1 step; "00" is the
        # default (the third 12-05 session's block-kernel routing, timed there only through
        # profile_wide_gemv.py --block: 281.3-281.6 tokens/s); then the two kernels' GPU tests
        for gs in 00 10 20 01 11 21 00; do
            HYBRIDLM_GEMV_PRELOAD=${gs:0:1} HYBRIDLM_MOE_SHARED_PRELOAD=${gs:1:1} timeout 95 $run --contexts 4k \
                --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/preload_$gs.json" || true
            python3 -m hybridlm.profile_report "$out/preload_$gs.json" | sed -n 2p | sed "s/^/$gs /" \
                | tee -a "$out/preload_4k_b1.txt" || true
        done
        timeout 100 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_gemv.py \
            tests/ops/test_moe_decode.py --tb=short 2>&1 | tee "$out/tests_preload.txt" | tail -5 || true
        ;;
    blockwide)
        # the wide input projections (12,352 and 9,216 x 2,048) on the block matrix-vector kernel, now launched
        # with PDL, against cuBLAS in the compiled 4k batch-1 step (third 12-05 session), then the kernel's GPU tests
        timeout 95 $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json \
            > "$out/blockwide_default.json" || true
        timeout 95 python3 benchmarks/experiments/profile_wide_gemv.py --block --preset qwen3-next-80b-a3b --experts 32 \
            --no-twin --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json \
            > "$out/blockwide_block.json" || true
        for f in default block; do
            python3 -m hybridlm.profile_report "$out/blockwide_$f.json" | sed -n 2p | sed "s/^/$f /" \
                | tee -a "$out/blockwide_4k_b1.txt" || true
        done
        timeout 90 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_gemv.py --tb=short 2>&1 \
            | tee "$out/tests_gemv.txt" | tail -5 || true
        ;;
    order)
        # per-kernel PDL order in the compiled 4k batch-1 step (HYBRIDLM_PDL_WAIT_FIRST: the kernels that wait
        # before letting their successor launch; new in the third 12-05 session: 271.7-273.4 tokens/s for every
        # choice, so none by default), then the MoE chain's order combinations again
        for w in none route route,conv,gdn_decode route,gate_up,down \
                 route,conv,gdn_decode,gate_up,down,qk_rope,split_kv,combine none route; do
            ww=${w/none/}
            HYBRIDLM_PDL_WAIT_FIRST=$ww timeout 95 $run --contexts 4k --batch 1 --compile --decode-steps 64 \
                --prefill-repeats 1 --json > "$out/order_${w//,/+}.json" || true
            python3 -m hybridlm.profile_report "$out/order_${w//,/+}.json" | sed -n 2p | sed "s/^/$w /" \
                | tee -a "$out/order_4k_b1.txt" || true
        done
        timeout 60 python3 benchmarks/experiments/moe_lookahead.py --no-prefetch --json "$out/moe_orders.json" 2>&1 \
            | tee "$out/moe_orders.txt" || true
        ;;
    fused)
        # the fused MoE decode kernel (routing + experts in one launch with a grid barrier) and the conv in the GDN
        # decode kernel: the MoE kernel A/B at Qwen3-Next's expert shapes (checked bit for bit first), the 4k
        # batch-1 step compiled with neither / both / the MoE one (HYBRIDLM_MOE_FUSED, HYBRIDLM_GDN_CONV_FUSED),
        # then their GPU tests and the static-decode tests (timeouts: a barrier that never opens would hang)
        timeout 100 python3 benchmarks/experiments/moe_fused_ab.py --json "$out/moe_fused_ab.json" 2>&1 \
            | tee "$out/moe_fused_ab.txt" || true
        for f in 00 11 10; do
            HYBRIDLM_MOE_FUSED=${f:0:1} HYBRIDLM_GDN_CONV_FUSED=${f:1:1} timeout 120 $run --contexts 4k --batch 1 \
                --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/fused${f}_compiled_4k_b1.json" || true
            python3 -m hybridlm.profile_report "$out/fused${f}_compiled_4k_b1.json" | sed -n 2p | sed "s/^/$f /" \
                | tee -a "$out/fused_4k_b1.txt" || true
        done
        HYBRIDLM_MOE_FUSED=1 HYBRIDLM_GDN_CONV_FUSED=1 timeout 200 python3 -m pytest -p no:cacheprovider -o addopts="" \
            -q -x tests/ops/test_moe_fused.py tests/ops/test_conv_decode.py tests/test_static_decode.py --tb=short 2>&1 \
            | tee "$out/tests_fused.txt" | tail -15 || true
        ;;
    fusedtests)
        # the two fused decode kernels' GPU tests (all of them, after the first run stopped at a test that
        # expected bit-equal sums from different tile shapes), then the default step's 4-layer compiled trace
        HYBRIDLM_MOE_FUSED=1 HYBRIDLM_GDN_CONV_FUSED=1 timeout 300 python3 -m pytest -p no:cacheprovider -o addopts="" \
            -q tests/ops/test_moe_fused.py tests/ops/test_conv_decode.py tests/test_static_decode.py \
            -k "fused or conv or barrier or graph or layer or batch1 or opcheck or compile" --tb=short 2>&1 \
            | tee "$out/tests_fused.txt" | tail -25 || true
        timeout 150 python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -40 \
            | tee "$out/trace.txt" || true
        ;;
    tma)
        python3 benchmarks/experiments/decode_tma.py --json "$out/decode_tma.json" 2>&1 | tee "$out/decode_tma.txt" || true
        ;;
    kernels)
        python3 benchmarks/kernels.py --max-minutes 8 --json "$out/kernels.json" --out "$out" 2>&1 | tee "$out/kernels.log"
        ;;
    transformers)
        $run --contexts 4k --batch 1 --compile --transformers --decode-steps 32 --prefill-repeats 3 --json \
            > "$out/transformers_compiled.json"
        python3 -m hybridlm.profile_report "$out/transformers_compiled.json" | tee "$out/transformers_compiled.txt"
        ;;
    compiled)
        for ctx_batch in 512k:10 1m:5; do
            $run --contexts "${ctx_batch%%:*}" --batch "${ctx_batch##*:}" --fill --compile --decode-steps 32 --json \
                > "$out/compiled_${ctx_batch%%:*}.json"
        done
        python3 -m hybridlm.profile_report "$out"/compiled_*.json | tee "$out/compiled.txt"
        ;;
    attn128)
        for heads in 8:1 8:8; do
            python3 benchmarks/experiments/decode_attn_sweep.py --dim 128 --heads "$heads" \
                --shapes 1x131072,1x1048576,8x32768,32x131072 --json "$out/decode_attn_d128_${heads/:/_}.json" \
                | grep -E "^copy|^best|stages 3 bs 64 warps 4 splits|stages 1 bs 64 warps 4 splits" | tee -a "$out/attn128.txt"
        done
        ;;
    decode)
        python3 benchmarks/decode_sweep.py --batches 32,64 --json "$out/decode_sweep_pipelined.json" 2>&1 \
            | tee "$out/decode_sweep_pipelined.txt"
        ;;
    forward)
        python3 benchmarks/experiments/forward_ab.py --json "$out/forward_ab.json" 2>&1 | tee "$out/forward_ab.txt"
        ;;
    gemv)
        python3 benchmarks/experiments/gemv_ab.py --json "$out/gemv_ab.json" 2>&1 | tee "$out/gemv_ab.txt"
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --json > "$out/profile_4k_b1.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" | tee "$out/profile_4k_b1.txt"
        python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -30 | tee "$out/trace.txt"
        ;;
    moe)
        python3 benchmarks/experiments/moe_decode_stages.py --experts 32 --batches 1,2,4 \
            --json "$out/moe_e32.json" 2>&1 | tee "$out/moe.txt"
        python3 benchmarks/experiments/moe_decode_stages.py --experts 512 --layers 4 --batches 1,4,16,48 \
            --json "$out/moe_e512.json" 2>&1 | tee -a "$out/moe.txt"
        ;;
    attn)
        i=0
        for order in 0:3:64:8,0:4:64:4,0:3:64:4,0:4:64:8 0:4:64:8,0:3:64:4,0:4:64:4,0:3:64:8; do
            i=$((i + 1))
            python3 benchmarks/experiments/decode_attn_sweep.py --configs "$order" \
                --json "$out/attn_16_2_256_order$i.json" | grep -vE "^ *$" | tee -a "$out/attn.txt"
        done
        for heads in 8:8 8:1; do
            python3 benchmarks/experiments/decode_attn_sweep.py --dim 128 --heads "$heads" --configs 0:3:64:4,0:4:64:4,0:3:32:4 \
                --shapes 1x131072,1x1048576,8x32768,32x131072 --json "$out/attn_${heads/:/_}_128.json" \
                | grep -vE "^ *$" | tee -a "$out/attn.txt"
        done
        ;;
    pdl)
        python3 benchmarks/experiments/pdl_chain.py --json "$out/pdl_chain.json" 2>&1 | tee "$out/pdl_chain.txt"
        ;;
    l2)
        python3 benchmarks/experiments/l2_prefetch.py --json "$out/l2_prefetch.json" 2>&1 | tee "$out/l2_prefetch.txt"
        ;;
    moedense)
        python3 benchmarks/experiments/moe_dense_ab.py --json "$out/moe_dense_ab.json" 2>&1 | tee "$out/moe_dense_ab.txt"
        ;;
    attn8_1)
        python3 benchmarks/experiments/decode_attn_sweep.py --dim 128 --heads 8:1 --shapes 1x131072,8x32768 \
            --json "$out/attn_8_1_128_sweep.json" | grep -E "^copy|^best|^B " | tee "$out/attn8_1.txt"
        ;;
    views)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_decode.py tests/test_static_decode.py \
            tests/ops/test_ops_delta_rule.py tests/ops/test_triton_norm.py --tb=short 2>&1 | tee "$out/tests_views.txt" | tail -12 || true
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --json > "$out/profile_4k_b1.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" | tee "$out/profile_4k_b1.txt"
        python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -30 | tee "$out/trace.txt"
        python3 benchmarks/decode_sweep.py --batches 32,64 --no-pipelined --json "$out/decode_sweep.json" 2>&1 | tee "$out/decode_sweep.txt"
        ;;
    recheck)
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 5 --json > "$out/profile_4k_b1_rep5.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1_rep5.json" | tee "$out/profile_4k_b1_rep5.txt"
        $run --contexts 4k --batch 8 --compile --decode-steps 32 --prefill-repeats 3 --json > "$out/profile_4k_b8.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b8.json" | tee "$out/profile_4k_b8.txt"
        ;;
    pdl2)
        HYBRIDLM_PDL=1 python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_gemv.py \
            tests/ops/test_triton_norm.py tests/test_static_decode.py --tb=short 2>&1 | tee "$out/tests_pdl2.txt" | tail -12 || true
        HYBRIDLM_PDL=1 python3 benchmarks/experiments/gemv_ab.py --json "$out/gemv_ab.json" 2>&1 | tee "$out/gemv_ab.txt"
        # the sixth 12-03 session's run of this part did not finish this profile in 7 minutes
        # (watchdog.py prints the whole stack, outermost frames included, if it is still running at 150 s)
        HYBRIDLM_PDL=1 python3 benchmarks/experiments/watchdog.py 150 -m hybridlm.cli profile --preset qwen3-next-80b-a3b \
            --experts 32 --no-twin --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 3 --json \
            > "$out/profile_4k_b1.json" 2> "$out/profile_4k_b1.err" || true
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" | tee "$out/profile_4k_b1.txt" || true
        HYBRIDLM_PDL=0 $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 3 --json \
            > "$out/profile_4k_b1_nopdl.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1_nopdl.json" | tee "$out/profile_4k_b1_nopdl.txt"
        HYBRIDLM_PDL=1 python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -30 \
            | tee "$out/trace.txt"
        python3 benchmarks/experiments/watchdog.py 90 benchmarks/experiments/inductor_multi_output_chain.py --device cuda \
            --layers 4,8,12,16 --seconds 600 2>&1 \
            | tail -20 | tee "$out/inductor_chain.txt" || true
        ;;
    stall)
        # the 48-layer compiled step with the add + norm custom op (the whole stack printed at 240 s if it stalls),
        # then the default compiled step and the uncompiled graph step, in the same call
        python3 benchmarks/experiments/watchdog.py 240 benchmarks/experiments/profile_add_norm_op.py \
            --preset qwen3-next-80b-a3b --experts 32 --no-twin --contexts 4k --batch 1 --compile --decode-steps 64 \
            --prefill-repeats 1 --json > "$out/profile_4k_b1_addnorm_op.json" 2> "$out/profile_4k_b1_addnorm_op.err" || true
        python3 -m hybridlm.profile_report "$out/profile_4k_b1_addnorm_op.json" | tee "$out/profile_4k_b1_addnorm_op.txt" || true
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/profile_4k_b1.json"
        $run --contexts 4k --batch 1 --decode-steps 64 --prefill-repeats 1 --json > "$out/graph_4k_b1.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" "$out/graph_4k_b1.json" | tee "$out/profile_4k_b1.txt"
        ;;
    wide)
        # the wide input projections on the one-row matrix-vector kernel (PDL chain unbroken) against cuBLAS,
        # 4k batch 1 compiled; launches: programs a multiprocessor x weight elements a block
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/wide_default.json"
        for launch in 4:16384 2:16384 1:16384 2:8192 4:8192; do
            python3 benchmarks/experiments/profile_wide_gemv.py --programs-per-sm "${launch%%:*}" \
                --row-elements "${launch##*:}" --preset qwen3-next-80b-a3b --experts 32 --no-twin --contexts 4k \
                --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/wide_${launch/:/_}.json"
        done
        for f in "$out"/wide_*.json; do echo "$f"; python3 -m hybridlm.profile_report "$f" | sed -n 2p; done | tee "$out/wide.txt"
        ;;
    order)
        # every PDL kernel's trigger and wait in both orders: the decode kernel's chain, then the 4k batch-1
        # step compiled (the add + norm op now kept under compile) and as the uncompiled graph
        for order in trigger-first wait-first; do
            HYBRIDLM_PDL_ORDER=$order python3 benchmarks/experiments/decode_pdl_small.py --batches 1,8,32 \
                --json "$out/pdl_chain_$order.json" 2>&1 | grep "^PDL=" | tee -a "$out/order.txt"
        done
        for i in 1 2; do
            for order in trigger-first wait-first; do
                for compiled in --compile ""; do
                    name=${compiled:+compiled}; name=${name:-graph}
                    HYBRIDLM_PDL_ORDER=$order $run --contexts 4k --batch 1 $compiled --decode-steps 64 --prefill-repeats 1 \
                        --json > "$out/order_${name}_${order}_$i.json"
                done
            done
        done
        python3 -m hybridlm.profile_report "$out"/order_*.json | tee -a "$out/order.txt"
        ;;
    pdlb1)
        for compiled in --compile ""; do
            name=${compiled:+compiled}; name=${name:-graph}
            $run --contexts 4k --batch 1 $compiled --decode-steps 64 --prefill-repeats 1 --json > "$out/pdlb1_${name}_default.json"
            python3 benchmarks/experiments/profile_decode_nopdl.py --preset qwen3-next-80b-a3b --experts 32 --no-twin \
                --contexts 4k --batch 1 $compiled --decode-steps 64 --prefill-repeats 1 --json > "$out/pdlb1_${name}_gdn_nopdl.json"
        done
        python3 -m hybridlm.profile_report "$out"/pdlb1_*.json | tee "$out/pdlb1.txt"
        ;;
    graphpdl)
        for pdl in 1 0; do
            HYBRIDLM_PDL=$pdl $run --contexts 4k --batch 1 --decode-steps 64 --prefill-repeats 3 --json \
                > "$out/graph_4k_b1_pdl$pdl.json"
            python3 -m hybridlm.profile_report "$out/graph_4k_b1_pdl$pdl.json" | tee "$out/graph_4k_b1_pdl$pdl.txt"
        done
        ;;
    pdl3)
        HYBRIDLM_PDL=1 python3 -m pytest -p no:cacheprovider -o addopts="" -q -k pdl_on_cuda tests/test_static_decode.py \
            --tb=short 2>&1 | tee "$out/tests_pdl3.txt" | tail -12 || true
        for pdl in 1 0; do
            HYBRIDLM_PDL=$pdl $run --contexts 128k --batch 36 --fill --compile --decode-steps 32 --json \
                > "$out/compiled_128k_b36_pdl$pdl.json"
            python3 -m hybridlm.profile_report "$out/compiled_128k_b36_pdl$pdl.json" | tee "$out/compiled_128k_b36_pdl$pdl.txt"
        done
        for pdl in 0 1; do  # consecutive decode steps in one graph: does the launch overlap move batch 32 past 90%?
            HYBRIDLM_PDL=$pdl python3 benchmarks/decode_sweep.py --batches 32,64 --no-pipelined \
                --json "$out/decode_sweep_pdl$pdl.json" 2>&1 | tee "$out/decode_sweep_pdl$pdl.txt"
        done
        ;;
    route)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_moe_route.py tests/ops/test_qk_rope.py \
            tests/ops/test_moe_decode.py tests/test_static_decode.py --tb=short 2>&1 | tee "$out/tests_route.txt" | tail -12 || true
        python3 benchmarks/experiments/moe_route_ab.py --json "$out/moe_route_ab.json" 2>&1 | tee "$out/moe_route_ab.txt"
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --json > "$out/profile_4k_b1.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" | tee "$out/profile_4k_b1.txt"
        $run --contexts 4k --batch 1 --decode-steps 64 --json > "$out/profile_4k_b1_graph.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1_graph.json" | tee "$out/profile_4k_b1_graph.txt"
        python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -30 | tee "$out/trace.txt"
        ;;
    layout)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_moe_decode.py tests/test_static_decode.py \
            tests/layers/test_packing.py --tb=short 2>&1 | tee "$out/tests_layout.txt" | tail -12 || true
        python3 benchmarks/experiments/moe_dense_ab.py --json "$out/moe_dense_ab.json" 2>&1 | tee "$out/moe_dense_ab.txt"
        python3 benchmarks/experiments/moe_decode_stages.py --experts 32 --batches 1,2,4 --shared 512 --down-contiguous \
            --json "$out/moe_layouts.json" 2>&1 | grep -E "default" | tee "$out/moe_layouts.txt"
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --json > "$out/profile_4k_b1.json"
        python3 -m hybridlm.profile_report "$out/profile_4k_b1.json" | tee "$out/profile_4k_b1.txt"
        python3 benchmarks/step_trace.py --layers 4 --compile --json "$out/trace.json" 2>&1 | tail -30 | tee "$out/trace.txt"
        $run --contexts 128k --batch 36 --fill --compile --decode-steps 32 --json > "$out/compiled_128k_b36.json"
        python3 -m hybridlm.profile_report "$out/compiled_128k_b36.json" | tee "$out/compiled_128k_b36.txt"
        ;;
    half)
        # the prep's inverse on float16 operands (the default for 16-bit inputs since 2026-12-05) against tf32's, one process
        python3 benchmarks/experiments/forward_ab.py --half-inverse --maxnreg none,128 \
            --json "$out/half_forward_ab.json" 2>&1 | tee "$out/half_forward_ab.txt"
        python3 -m pytest -x -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_chunk.py \
            -k "bfloat16 or compiles or packed or half" --tb=short 2>&1 | tee "$out/half_tests_chunk.txt" | tail -12 || true
        ;;
    h100profile)
        # the card: #7's three targets on an H100 (80 GB: smaller largest batches than the H200's)
        $run --contexts 4k --batch 1 --compile --transformers --decode-steps 32 --prefill-repeats 3 --json \
            > "$out/h100_transformers.json"
        python3 -m hybridlm.cli profile --preset qwen3-next-80b-a3b --experts 32 --contexts 128k --batch 1 --fill \
            --at-max-batch --decode-steps 32 --json > "$out/h100_128k_twin.json"
        # compiled at 128k: inductor's buffers need room beside the cache, so 90% of the largest batch
        b=$(python3 -c "import json,sys; r=[x for x in json.load(open(sys.argv[1])) if x['at_max_batch'] and
            x['model']=='qwen3-next-80b-a3b']; print(max(1, int(r[0]['batch'] * 0.9)))" "$out/h100_128k_twin.json")
        $run --contexts 128k --batch "$b" --fill --compile --decode-steps 32 --json > "$out/h100_128k_compiled.json" || true
        python3 -m hybridlm.profile_report "$out"/h100_*.json | tee "$out/h100_profile.txt"
        ;;
    early2)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_decode.py tests/test_static_decode.py \
            --tb=short 2>&1 | tee "$out/early2_tests.txt" | tail -12 || true
        python3 benchmarks/experiments/decode_state_early.py --batches 1,8,32 --json "$out/early2_decode.json" \
            2>&1 | tee "$out/early2_decode.txt"
        ;;
    early)
        python3 benchmarks/experiments/decode_state_early.py --batches 1,8,32,64,128 --json "$out/early_decode.json" \
            2>&1 | tee "$out/early_decode.txt"
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_decode.py tests/test_static_decode.py \
            --tb=short 2>&1 | tee "$out/early_tests.txt" | tail -12 || true
        $run --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/early_4k_b1_settled.json"
        python3 benchmarks/experiments/profile_state_unsettled.py --preset qwen3-next-80b-a3b --experts 32 --no-twin \
            --contexts 4k --batch 1 --compile --decode-steps 64 --prefill-repeats 1 --json > "$out/early_4k_b1_unsettled.json"
        python3 -m hybridlm.profile_report "$out"/early_4k_b1_*.json | tee "$out/early_4k_b1.txt"
        ;;
    tests)
        python3 -m pytest -p no:cacheprovider -o addopts="" -q tests/ops/test_decode_attention.py tests/ops/test_moe_decode.py \
            tests/ops/test_triton_gemv.py tests/ops/test_triton_decode.py tests/layers/test_packing.py \
            tests/ops/test_triton_conv.py tests/ops/test_triton_norm.py tests/test_static_decode.py \
            tests/ops/test_moe_route.py tests/ops/test_qk_rope.py --tb=short 2>&1 | tee "$out/tests_layers.txt" | tail -12 || true
        python3 -m pytest -x -p no:cacheprovider -o addopts="" -q tests/ops/test_triton_chunk.py \
            -k "bfloat16 or compiles or packed" --tb=short 2>&1 | tee "$out/tests_chunk.txt" | tail -12 || true
        ;;
    *)
        echo "PART: unknown '$part' (expected kernels, transformers, compiled, attn128, decode, forward, gemv, moe, attn," \
             "attn8_1, moedense, pdl, pdl2, pdl3, stall, graphpdl, pdlb1, layout, l2, views, route, recheck, tests)" >&2
        exit 2
        ;;
esac
done
