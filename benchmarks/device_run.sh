#!/usr/bin/env bash
# One call on a lent GPU machine (no network): set up (benchmarks/device_setup.sh), then the named stages in order,
# each under a share of a wall-clock deadline so the call returns before the device's command limit, every log in $OUT.
#   BUDGET=560 bash benchmarks/device_run.sh probe tests tune block-e2e traffic host gemm-in-model large-offline
# A prebuilt native library (backends/cutlass/libqfx_cutlass.so.xz + qfx_cutlass_manifest.json.xz, built by the same
# CUDA as the device's torch) is unpacked instead of building (~90 s with 16 jobs).
# Stages:
#   probe          benchmarks/block_exactness_probe.py (which erf torch uses; block kernels vs the definition)
#   tests          python -m pytest -m gpu tests -n 4 (the whole GPU suite; needs the pytest-xdist wheel in .whl/)
#   tune           benchmarks/gemm.py --block 128 --tuned-out backends/triton/tuned_block_sm90.json (tiles per shape,
#                  then the block GEMM table with them); later stages of the same call use the table
#   tune-short-k   benchmarks/gemm.py over BERT's short-K roles (qkv, attn_out, ffn_in; M 16384 and 8192) with every
#                  sm90 config built, merged into backends/cutlass/tuned_sm90.json (--tuned-merge: the other shapes
#                  keep their choices); later stages of the same call use the table
#   ncu-short-k    Nsight Compute on the qkv GEMM at M = 16384 (BERT-base 128 x 128), the default config and the
#                  64 x 128 epilogue-tile candidate: what bounds the short-K roles
#   block-e2e      issue 23 rows: BERT-base 128x128 and BERT-large 32x384, int8 / int8+blk128 / int4+blk128 vs the peers
#   traffic        issue 24 rows: lengths uniform, padding sweep, batch-1 sweep, kernels per forward
#   host           benchmarks/host_overhead.py (batch-1 host time of the call path)
#   gemm-in-model  benchmarks/gemm_in_model.py --act-block 128 --block-bits 8 4
#   large-offline  BERT-large 128x384, lengths uniform in [96, 384] (sequences/s)
#   encode         issue 24's encode() case: 8,192 Rotten Tomatoes snippets (needs $QFX_CORPUS: the csv.bz2, and
#                  QFX_MINILM_DIR: an fp16 copy of the packaged MiniLM), ST fp32 / fp16 vs qfx int8
#   varlen         benchmarks/attention.py --varlen (packed attention kernels vs the padded ones, per shape)
#   fp8-probe      benchmarks/fp8_int4_probe.py (are int4 codes exact on the FP8 tensor cores, per K and pattern?)
# A library built by this call comes back xz-compressed in $OUT (~1.5 MB: carry it, unpacked in place, to skip the
# next call's build), and the logs come back as one logs.tar.xz: the device returns at most 8 files from $OUT.
set -u
T0=$(date +%s); DEADLINE=$((T0 + ${BUDGET:-560}))
OUT=${OUT:-/tmp/qfx_out}; mkdir -p "$OUT"
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "$* at $(( $(date +%s) - T0 )) s" >> "$OUT/stages.log"; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  source benchmarks/device_setup.sh
  if [ "${QFX_SKIP_NATIVE:-0}" != 1 ] && [ -f backends/cutlass/libqfx_cutlass.so ]; then  # built here: send it back
    xz -T16 -c backends/cutlass/libqfx_cutlass.so > "$OUT/libqfx_cutlass.so.xz"
    xz -c backends/cutlass/qfx_cutlass_manifest.json > "$OUT/qfx_cutlass_manifest.json.xz"
  fi
  ls .whl/pytest_xdist*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/pytest_xdist*.whl .whl/execnet*.whl
} > "$OUT/setup.log" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
log "setup done"
n=$#; i=0
for stage in "$@"; do
  i=$((i + 1)); share=$(( $(left) / (n - i + 1) ))  # an equal share of what is left
  [ "$share" -lt 20 ] && { log "$stage skipped (no time)"; continue; }
  case $stage in
    probe) timeout "$share" python benchmarks/block_exactness_probe.py > "$OUT/probe.log" 2>&1 ;;
    tests) timeout "$share" python -m pytest -m gpu tests -n 4 -v -rfE --tb=short -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1 ;;
    tune) (cd benchmarks && timeout "$share" python gemm.py --block 128 --h 768 1024 --m 16384 8192 2048 128 \
            --tuned-out ../backends/triton/tuned_block_sm90.json) > "$OUT/gemm_block.log" 2>&1
          rc=$?; cp backends/triton/tuned_block_sm90.json "$OUT/" 2>/dev/null; (exit $rc) ;;
    tune-short-k) (cd benchmarks && timeout "$share" python gemm.py --h 768 1024 --m 16384 8192 \
                    --roles qkv attn_out ffn_in --json "$OUT/gemm_short_k.json" \
                    --tuned-out ../backends/cutlass/tuned_sm90.json --tuned-merge) > "$OUT/gemm_short_k.log" 2>&1
                  rc=$?; cp backends/cutlass/tuned_sm90.json "$OUT/" 2>/dev/null; (exit $rc) ;;
    ncu-short-k) for cfg in "" sm90_s8_pp_128x128x128_c2x1_e64x128; do
                   (cd benchmarks && timeout $(( share / 2 )) ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight \
                     --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
                     python block_gemm_profile.py --variant tok --role qkv --m 16384 ${cfg:+--config $cfg}) \
                     > "$OUT/ncu_qkv${cfg:+_$cfg}.log" 2>&1
                 done ;;
    block-e2e) (cd benchmarks && timeout "$share" python e2e.py --models bert-base,bert-large \
                 --modes int8,int8+blk128,int4+blk128 --shapes 128x128,32x384 --compile-shapes goal --no-direct --iters 20) \
               > "$OUT/e2e_block.log" 2>&1 ;;
    traffic) (cd benchmarks && timeout "$share" python e2e.py --models bert-base --modes int8,int8+blk128 \
               --shapes 128x128,1x128 --lengths uniform --compile-shapes 128x128,1x128 --pad-sweep --batch1-sweep --kernels \
               --no-direct --iters 20) > "$OUT/e2e_traffic.log" 2>&1 ;;
    host) (cd benchmarks && timeout "$share" python host_overhead.py) > "$OUT/host_overhead.log" 2>&1 ;;
    gemm-in-model) (cd benchmarks && timeout "$share" python gemm_in_model.py --act-block 128 --block-bits 8 4) \
                   > "$OUT/gemm_in_model.log" 2>&1 ;;
    large-offline) (cd benchmarks && timeout "$share" python e2e.py --models bert-large --modes int8 --shapes 128x384 \
                     --lengths uniform --compile-shapes none --no-direct --iters 10) > "$OUT/e2e_large_offline.log" 2>&1 ;;
    encode) (cd benchmarks && timeout "$share" python e2e.py --models none --encode 8192 \
              --encode-corpus "${QFX_CORPUS:?}") \
            > "$OUT/e2e_encode.log" 2>&1 ;;
    varlen) (cd benchmarks && timeout "$share" python attention.py --varlen) > "$OUT/attention_varlen.log" 2>&1 ;;
    fp8-probe) timeout "$share" python benchmarks/fp8_int4_probe.py > "$OUT/fp8_int4_probe.log" 2>&1 ;;
    *) echo "unknown stage $stage" >> "$OUT/stages.log"; continue ;;
  esac
  log "$stage rc $?"
done
# every log and table into one archive (the device returns at most 8 files), the library beside it
(cd "$OUT" && ls | grep -v -e '\.xz$' > /tmp/qfx_logs.txt && tar -cJf logs.tar.xz -T /tmp/qfx_logs.txt \
  && xargs rm -f < /tmp/qfx_logs.txt)
