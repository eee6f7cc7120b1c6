#!/usr/bin/env bash
# One device call: GPU tests, config sweep, the kernel table, the decode bench.
# Usage (on the device, repo root):  bash benchmarks/kernels/run_gpu.sh [stages...]
# stages: info tests repro sweep sweeptc sweeptc64 sweepsa sweepperm sweepwaves sweepl2 sweepw3occ sweepxl sweepwide sweeph2 large sweepsmall sweepsym bench benchsmall benchmid chunked layouts ceiling tcceiling dequant decode decodehead decodepdl decodeprof decodewhatif decode1 decode1b decodepicks chain decodeab decodetrig sweepgu carveout mlpchain decodeattn attn ncusmall ncutc ncum1 ncuwide ncu   (default: info tests sweep bench decode)
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STAGES=${*:-info tests sweep bench decode}
T0=$(date +%s)
stamp() { echo "== [$(( $(date +%s) - T0 ))s] $*"; }
for s in $STAGES; do
  case $s in
    info)
      stamp info
      nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu --format=csv
      python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name())"
      python3 -c "import matplotlib; print('matplotlib', matplotlib.__version__)" 2>/dev/null || echo "no matplotlib: plots skipped" ;;
    tests)
      stamp tests
      timeout 200 python3 -m pytest -q -x -p no:cacheprovider -n 8 -m "not timing" tests/kernels/test_gpu.py 2>&1 \
        | grep -v Warning | tail -15 | tee "$OUT/tests.log"
      timeout 60 python3 -m pytest -q -x -p no:cacheprovider -m timing tests/kernels/test_gpu.py 2>&1 \
        | grep -v Warning | tail -15 | tee -a "$OUT/tests.log"
      timeout 90 python3 -m pytest -q -x -p no:cacheprovider -m gpu tests/pipeline/test_kernel_choices.py 2>&1 \
        | grep -v Warning | tail -15 | tee -a "$OUT/tests.log" ;;
    repro)  # run 11: the NaN the agreement check caught in "gemm trans BM256" (split-K bookkeeping?)
      stamp repro
      timeout 200 python3 benchmarks/kernels/repro_splitk.py 2>&1 | grep -v Warning | tee "$OUT/repro.log" ;;
    sweep)
      stamp sweep
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --shapes 8192x28672 \
        --m 1 16 2048 --bits 4 3 --reps 15 --out "$OUT/sweep" 2>&1 | grep -v Warning | tee "$OUT/sweep.log" | tail -60 ;;
    sweeptc)  # tensor-core paths at small M: fp16-pair fragment-order GEMM (gemm_h2.py) vs the fp32-decode one
      stamp sweeptc
      timeout 300 python3 -m pipeline.evaluate.bench_kernels --sweep --only tc --shapes 8192x28672 28672x8192 \
        --m 4 16 --bits 4 3 --reps 15 --out "$OUT/sweeptc" 2>&1 | grep -v Warning | tee "$OUT/sweeptc.log" | tail -80 ;;
    sweeptc64)  # run 13: M=32/64 with the scale in the tile (one accumulator, 122-178 registers instead of 255)
      stamp sweeptc64
      timeout 300 python3 -m pipeline.evaluate.bench_kernels --sweep --only tc --shapes 8192x28672 28672x8192 \
        --m 32 64 --bits 4 3 --reps 15 --out "$OUT/sweeptc64" 2>&1 | grep -v Warning | tee "$OUT/sweeptc64.log" | tail -120 ;;
    sweepsa)  # run 13: the BM>=32 winners with the scale in the tile (default now) vs after the dot (" sa")
      stamp sweepsa
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --only "BN128 w4 x3" "BN128 w4 x4 r128" \
        "BN256 w8 x2 r128" "BN128 w8 x2" --shapes 8192x28672 28672x8192 --m 32 64 --bits 4 3 --reps 15 \
        --out "$OUT/sweepsa" 2>&1 | grep -v Warning | tee "$OUT/sweepsa.log" | tail -80 ;;
    sweepperm)  # run 13: the M<=16 GEMM with tile rows in the 16-byte-load column order, side by side
      stamp sweepperm
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --only "BN128 w4 x4 r128" "BN128 w4 x3" \
        "BN128 w4 x12 r128" --shapes 8192x28672 28672x8192 3584x18944 --m 4 16 --bits 4 3 --reps 15 \
        --out "$OUT/sweepperm" 2>&1 | grep -v Warning | tee "$OUT/sweepperm.log" | tail -80 ;;
    sweepwaves)  # run 11 (untimed): the M=16 fp16-pair GEMM in 2-3 waves of k-splits (x8/x12/x16) next to one wave (x4)
      stamp sweepwaves
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --sweep --only "BN128 w4 x4 r128" "x8 r128" "x12 r128" "x16 r128" \
        --shapes 8192x28672 28672x8192 8192x8192 --m 4 16 --bits 4 3 --reps 15 --out "$OUT/sweepwaves" 2>&1 | grep -v Warning \
        | tee "$OUT/sweepwaves.log" | tail -60 ;;
    sweepl2)  # run 12: weight loads with the L2 256 B fetch hint (nc256) next to today's winners, M=1 and M=16
      stamp sweepl2
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only "h2 BN64 R16 w4 x8" \
        "h2 BN128 R16 w4 x4" "h2 BN128 R4 w4 x6" "h2 BN64 R4 w4 x8" "tc-h2 BM16 BN128 w4 x4 r128" \
        --shapes 8192x28672 28672x8192 3584x37888 --m 1 16 --bits 4 3 --reps 15 --out "$OUT/sweepl2" 2>&1 \
        | grep -v Warning | tee "$OUT/sweepl2.log" | tail -60 ;;
    sweepw3occ)  # run 12: W3 M=1 with register caps / 2-warp programs for more resident warps (ncum1: 24 per SM)
      stamp sweepw3occ
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only "h2 BN128 R4 w4 x6" \
        " r72" " r64" --shapes 8192x28672 28672x8192 3584x37888 --m 1 --bits 3 --reps 15 --out "$OUT/sweepw3occ" 2>&1 \
        | grep -v Warning | tee "$OUT/sweepw3occ.log" | tail -30 ;;
    sweepxl)  # run 12: x loaded where used (fewer registers, more programs per SM) vs today's M=1 winners
      stamp sweepxl
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only " xl" "h2 BN128 R4 w4 x7 r72" \
        "h2 BN64 R4 w2 x14 r72" "h2 BN64 R16 w4 x8 nc256" --shapes 8192x28672 28672x8192 3584x37888 18944x3584 --m 1 \
        --bits 3 4 --reps 15 --out "$OUT/sweepxl" 2>&1 | grep -v Warning | tee "$OUT/sweepxl.log" | tail -40 ;;
    sweepwide)  # run 13: iterations over several groups, 4-8 warps a program, no k-split on 8192->28672
      stamp sweepwide
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only " wide" \
        "h2 BN128 R4 w4 x7 r72" "h2 BN64 R4 w2 x14 r72" "h2 BN64 R4 w2 x16 xl" "h2 BN64 R16 w4 x8 nc256" \
        "h2 BN64 R16 w4 x8 xl nc256" --shapes 8192x28672 28672x8192 3584x37888 18944x3584 --m 1 \
        --bits 3 4 --reps 15 --out "$OUT/sweepwide" 2>&1 | grep -v Warning | tee "$OUT/sweepwide.log" | tail -50 ;;
    sweeph2)
      stamp sweeph2
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --shapes 8192x28672 \
        --m 1 --bits 4 3 --reps 15 --out "$OUT/sweeph2" 2>&1 | grep -v Warning | tee "$OUT/sweeph2.log" | tail -40 ;;
    sweepsmall)
      stamp sweepsmall
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --shapes 3584x4608 3584x3584 18944x3584 3584x37888 \
        --m 1 --bits 4 --reps 15 --out "$OUT/sweepsmall" 2>&1 | grep -v Warning | tee "$OUT/sweepsmall.log" | tail -30 ;;
    sweepsym)
      stamp sweepsym
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --shapes 8192x28672 \
        --m 1 --bits 4 --sym --reps 15 --out "$OUT/sweepsym" 2>&1 | grep -v Warning | tee "$OUT/sweepsym.log" | tail -20 ;;
    bench)
      stamp bench
      timeout 300 python3 -m pipeline.evaluate.bench_kernels --w4a8 --reps 15 --out "$OUT/bench" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.log" | tail -5 ;;
    large)
      stamp large
      timeout 300 python3 -m pipeline.evaluate.bench_kernels --m 512 2048 --reps 15 --out "$OUT/large" 2>&1 \
        | grep -v Warning | tee "$OUT/large.log" | tail -40 ;;
    benchmid)  # run 13: M=32 and 64 on every shape (batched decode)
      stamp benchmid
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --m 32 64 --reps 15 --out "$OUT/benchmid" 2>&1 \
        | grep -v Warning | tee "$OUT/benchmid.log" | tail -5 ;;
    benchsmall)
      stamp benchsmall
      timeout 240 python3 -m pipeline.evaluate.bench_kernels --m 1 4 16 --reps 15 --out "$OUT/bench" 2>&1 \
        | grep -v Warning | tee "$OUT/bench.log" | tail -5 ;;
    chunked)  # run 11: large M as column chunks through one L2-sized scratch weight
      stamp chunked
      timeout 200 python3 benchmarks/kernels/time_chunked.py 2>&1 | grep -v Warning | tee "$OUT/chunked.log" ;;
    layouts)  # run 12: cuBLAS at M=2048 with the 16-bit weight [in, out] (NN) vs F.linear's [out, in]
      stamp layouts
      timeout 150 python3 benchmarks/kernels/time_layouts.py 2>&1 | grep -v Warning | tee "$OUT/layouts.log" ;;
    ceiling)  # run 12: the M=1 GEMVs next to a kernel reading the same words in the same order, decoding nothing,
      # and (untimed yet) the GEMV's loop built up in layers: decode, + scales, + x
      stamp ceiling
      timeout 150 python3 benchmarks/kernels/time_read_ceiling.py 2>&1 | grep -v Warning | tee "$OUT/ceiling.log" ;;
    tcceiling)  # run 13: the M=16 GEMM next to its words read alone and with x's tiles through the same MMAs
      stamp tcceiling
      timeout 150 python3 benchmarks/kernels/time_tc_ceiling.py 2>&1 | grep -v Warning | tee "$OUT/tcceiling.log" ;;
    dequant)
      stamp dequant
      timeout 90 python3 benchmarks/kernels/time_dequant.py 2>&1 | grep -v Warning | tee "$OUT/dequant.log" ;;
    decode)
      stamp decode
      timeout 200 python3 -m pipeline.evaluate.bench_decode --out "$OUT/decode" 2>&1 | grep -v Warning | tee "$OUT/decode.log" ;;
    decodehead)  # the default variants plus the what-if of a packed lm_head (w4+head, w3+head)
      stamp decodehead
      timeout 200 python3 -m pipeline.evaluate.bench_decode --variants fp16 w4 w3 w4+head w3+head w3+head4 --out "$OUT/decode" 2>&1 \
        | grep -v Warning | tee "$OUT/decode.log" ;;
    decodewhatif)  # run 14: the batch-1 step without its RMSNorms / attention / both (timing bounds, wrong outputs)
      stamp decodewhatif
      for w in norm attn norm,attn; do
        VLMQ_DECODE_WHATIF=$w timeout 110 python3 -m pipeline.evaluate.bench_decode --batch 1 --variants fp16 w4 w3 \
          --out "$OUT/decode_whatif_${w/,/_}" 2>&1 | grep -v Warning | tee "$OUT/decode_whatif_${w/,/_}.log"
      done ;;
    decode1)  # batch 1 only, the default variants
      stamp decode1
      timeout 120 python3 -m pipeline.evaluate.bench_decode --batch 1 --out "$OUT/decode1" 2>&1 | grep -v Warning \
        | tee "$OUT/decode1.log" ;;
    decodepicks)  # run 14: the step with the o / qkv / down launches forced to depth-2 candidates, one process
      stamp decodepicks
      timeout 240 python3 benchmarks/kernels/time_decode_picks.py 2>&1 | grep -v Warning | tee "$OUT/decodepicks.log" ;;
    chain)  # run 14: the cost of a kernel boundary (dependent nop kernels in a graph, PDL on / off)
      stamp chain
      timeout 120 python3 benchmarks/kernels/time_chain.py 2>&1 | grep -v Warning | tee "$OUT/chain.log" ;;
    decode1b)  # the same in a second process (the autotuner's picks, and so the step, move between processes)
      stamp decode1b
      timeout 120 python3 -m pipeline.evaluate.bench_decode --batch 1 --variants fp16 w4 w3 --out "$OUT/decode1b" 2>&1 \
        | grep -v Warning | tee "$OUT/decode1b.log" ;;
    decodepdl)  # the same step without and with programmatic dependent launch, kernel breakdown of each
      stamp decodepdl
      timeout 120 python3 -m pipeline.evaluate.bench_decode --no-pdl --profile --batch 1 --out "$OUT/decode_nopdl" 2>&1 \
        | grep -v Warning | tee "$OUT/decode_nopdl.log"
      timeout 150 python3 -m pipeline.evaluate.bench_decode --profile --out "$OUT/decode" 2>&1 | grep -v Warning \
        | tee "$OUT/decode.log" ;;
    decodeprof)  # batch 1, PDL on, with the per-kernel breakdown
      stamp decodeprof
      timeout 150 python3 -m pipeline.evaluate.bench_decode --profile --batch 1 --out "$OUT/decode" 2>&1 \
        | grep -v Warning | tee "$OUT/decode.log"
      cat "$OUT"/decode/decode_profile.md 2>/dev/null ;;
    sweepgu)  # run 15: the decode MLP shapes with a wide BN64 (8 KB a program an iteration) next to today's picks
      stamp sweepgu
      timeout 200 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only "h2 BN64 R16 w4 x6" \
        "h2 BN64 R16 w4 x8 nc256" "h2 BN64 R32 w4 x5 r96" "h2 BN32 R32 w4 x8 nc256 wide" "h2 BN32 R32 w4 x6 nc256 wide" \
        --shapes 3584x37888 18944x3584 3584x4608 3584x3584 --m 1 --bits 4 --reps 15 --out "$OUT/sweepgu" 2>&1 \
        | grep -v Warning | tee "$OUT/sweepgu.log" | tail -40 ;;
    carveout)  # run 15: large M, the next chunk dequantized on SMs cuBLAS is asked to leave free
      stamp carveout
      timeout 300 python3 benchmarks/kernels/time_carveout.py 2>&1 | grep -v "Warning\|carveout for matmuls" \
        | tee "$OUT/carveout.log" ;;
    mlpchain)  # run 15: the MLP half of a decode layer as two PDL launches vs one persistent launch with a grid barrier
      stamp mlpchain
      timeout 200 python3 benchmarks/kernels/time_mlp_chain.py 2>&1 | grep -v Warning | tee "$OUT/mlpchain.log"
      timeout 200 python3 benchmarks/kernels/time_mlp_chain.py --maxnreg 80 2>&1 | grep -v Warning \
        | tee "$OUT/mlpchain80.log" ;;
    decodeattn)  # run 15: the step's attention launch shape (cache block, splits, warps) timed in the W4 step
      stamp decodeattn
      timeout 300 python3 benchmarks/kernels/time_decode_attn.py 2>&1 | grep -v Warning | tee "$OUT/decodeattn.log" ;;
    attn)
      stamp attn
      timeout 120 python3 benchmarks/kernels/time_attention.py 2>&1 | grep -v Warning | tee "$OUT/attn.log" ;;
    decodeab)  # PDL on, autotuner timing behind a PDL RMSNorm (default) vs each candidate alone
      stamp decodeab
      VLMQ_AUTOTUNE_PDL=0 timeout 100 python3 -m pipeline.evaluate.bench_decode --batch 1 --out "$OUT/decode_tunealone" 2>&1 \
        | grep -v Warning | tee "$OUT/decode_tunealone.log"
      timeout 100 python3 -m pipeline.evaluate.bench_decode --batch 1 --out "$OUT/decode_tunepdl" 2>&1 \
        | grep -v Warning | tee "$OUT/decode_tunepdl.log" ;;
    decodetrig)  # PDL releasing the next grid early (before the wait) instead of late
      stamp decodetrig
      VLMQ_PDL_TRIGGER=early timeout 100 python3 -m pipeline.evaluate.bench_decode --batch 1 --out "$OUT/decode_early" 2>&1 \
        | grep -v Warning | tee "$OUT/decode_early.log" ;;
    ncusmall)  # why the small decode GEMV (3584->4608) and the attention take 3-4x their byte time: stall reasons
      stamp ncusmall
      NCU="ncu --clock-control none -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
      VLMQ_AUTOTUNE=0 timeout 90 $NCU -k regex:gemv_h2 python3 -m pipeline.evaluate.bench_kernels --no-baselines \
        --shapes 3584x4608 --m 1 --bits 4 --reps 1 --calls 1 --jobs 1 --out /tmp/ncu > "$OUT/ncu_small.log" 2>&1
      timeout 90 $NCU -k regex:rope_attn python3 -c "
import torch
from kernels.decode_ops import rope_attention
qkv = torch.randn(1, 36 * 128, device='cuda').half(); kc = torch.randn(1, 4, 264, 128, device='cuda').half(); vc = torch.randn_like(kc)
f = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device='cuda').float() / 128)); p = torch.tensor([192], dtype=torch.int32, device='cuda')
for _ in range(3): rope_attention(qkv, f, p, kc, vc, 28, 4)
torch.cuda.synchronize()" > "$OUT/ncu_attn.log" 2>&1
      for f in ncu_small ncu_attn; do echo "-- $f"; grep -E "Duration|DRAM Throughput|Registers|Achieved Occupancy|Grid Size|Warp Cycles Per Issued|stalled_.*ratio +[a-z]* +[0-9.]+" "$OUT/$f.log" \
        | awk '{ if ($0 ~ /stalled/) { if ($NF+0 >= 0.3) print } else print }'; done ;;
    ncutc)  # run 10: the fp16-pair GEMM at M=16 on the two big shapes side by side (2.12 vs 2.33 TB/s): stall reasons
      stamp ncutc
      NCU="ncu --clock-control none -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
      for sh in 8192x28672 28672x8192; do
        VLMQ_AUTOTUNE=0 timeout 90 $NCU -k regex:gemm_h2 python3 -m pipeline.evaluate.bench_kernels --no-baselines \
          --shapes $sh --m 16 --bits 4 --reps 1 --calls 1 --jobs 1 --out /tmp/ncu > "$OUT/ncu_tc_$sh.log" 2>&1
        echo "-- $sh"; grep -E "Duration|DRAM Throughput|L2 Hit|Mem Busy|Max Bandwidth|Registers|Achieved Occupancy|Grid Size|Warp Cycles Per Issued|stalled_.*ratio +[a-z]* +[0-9.]+" "$OUT/ncu_tc_$sh.log" | awk '$NF+0 > 0.05 || !/stalled/'
      done ;;
    ncum1|ncuwide)  # run 12: the M=1 winners side by side, W3 (36.4 µs, missed) vs W4 (45.2, met): what limits W3;
      # run 13 (ncuwide): the wide-iteration winners (W3 33.9, W4 43.6)
      stamp $s
      NCU="ncu --clock-control none -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,lts__t_sectors_srcunit_tex_op_read.sum,smsp__inst_executed.sum"
      if [ $s = ncum1 ]; then VS=("3 h2 BN128 R4 w4 x6" "4 h2 BN64 R16 w4 x8 nc256"); tag=m1
      else VS=("3 h2 BN32 R16 w4 x6 xl wide" "4 h2 BN32 R32 w4 x6 nc256 wide"); tag=wide; fi
      for v in "${VS[@]}"; do
        b=${v%% *}; only=${v#* }
        timeout 90 $NCU -k regex:gemv_h2 python3 -m pipeline.evaluate.bench_kernels --sweep --no-baselines --only "$only" \
          --shapes 8192x28672 --m 1 --bits $b --reps 1 --calls 1 --jobs 1 --out /tmp/ncu > "$OUT/ncu_${tag}_w$b.log" 2>&1
        echo "-- W$b $only"; grep -E "Duration|DRAM Throughput|L2 Hit|Mem Busy|Max Bandwidth|Registers|Achieved Occupancy|Theoretical Occ|Grid Size|Warp Cycles Per Issued|Issued Warp|dram__bytes|lts__t_sectors|inst_executed|stalled_.*ratio +[a-z]* +[0-9.]+" "$OUT/ncu_${tag}_w$b.log" | awk '$NF+0 > 0.05 || !/stalled/'
      done ;;
    ncu)
      stamp ncu
      for b in 4 3; do
        VLMQ_AUTOTUNE=0 timeout 75 ncu --clock-control none -k regex:gemv -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
          python3 -m pipeline.evaluate.bench_kernels \
          --no-baselines --shapes 8192x28672 --m 1 --bits $b --reps 1 --calls 1 --jobs 1 --out /tmp/ncu > "$OUT/ncu$b.log" 2>&1
        echo "-- W$b (default config)"
        grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Registers|Achieved Occupancy|Theoretical Occ|Waves|Block Limit Reg|Grid Size" "$OUT/ncu$b.log"
      done ;;
  esac
done
stamp done
for f in "$OUT"/sweeph2/kernels.md "$OUT"/sweepsmall/kernels.md "$OUT"/sweep/kernels.md "$OUT"/bench/kernels.md "$OUT"/decode/decode.md; do [ -f "$f" ] && echo "-- $f" && tail -n 12 "$f"; done
