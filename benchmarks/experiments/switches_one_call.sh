#!/usr/bin/env bash
# The forward launch switches' A/B in one device call (benchmarks/NOTES.md, Next 00): apply
# fwd_launch_switches.patch, build once, compare each switch with the switches off in the same run
# (three short A/Bs, each at the N it is about), run the kernel tests with the new layouts on, then
# take the peer table by the CUDA-graph timer. Each step is skipped when less than its estimate is
# left of BUDGET_S (default 570). Logs go to $OUT.
#
#   BUDGET_S=570 bash benchmarks/experiments/switches_one_call.sh
source "$(dirname "$0")/../device_call.sh"

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
patch -p1 -s <benchmarks/experiments/fwd_launch_switches.patch || exit 1
step build 200 && python3 benchmarks/ab_kernels.py --build --rounds 0 base=. >"$OUT/build.log" 2>&1 ||
  { tail -20 "$OUT/build.log"; exit 1; }
grep "^built" "$OUT/build.log"

ab() { # ab NAME ESTIMATE_S ab_kernels.py-arguments...: its table is written after every run
  local name=$1 estimate=$2
  shift 2
  step "$name" "$estimate" || return 0
  timeout $(($(left) - 20)) python3 benchmarks/ab_kernels.py --rounds 2 --out "$OUT/$name" "$@" \
    >"$OUT/$name.log" 2>&1
  cat "$OUT/$name/ab.md" 2>/dev/null
}
# About 3 s per N, dtype, variant and round.
ab tiles_bf16 130 --dtypes bf16 --ns 32768,40960,49152,65536,98304,131072,262144 \
  base=. one=.:NORMPASS_EXP_FWD_ONE_TILE=1 four=.:NORMPASS_EXP_FWD_TILES=4
ab tiles_fp32 60 --dtypes fp32 --ns 16384,20480,24576,32768,65536 \
  base=. one=.:NORMPASS_EXP_FWD_ONE_TILE=1
ab waves 40 --dtypes bf16 --ns 256,1024,4096 base=. waves=.:NORMPASS_EXP_FWD_WAVES=4
# Both new layouts at once: one tile for clusters of 3-8, four tiles for the other cluster rows.
step tests 60 && NORMPASS_EXP_FWD_ONE_TILE=1 NORMPASS_EXP_FWD_TILES=4 python3 -m pytest -q -m gpu \
  -p no:cacheprovider tests/test_cuda_kernels.py >"$OUT/tests.log" 2>&1
tail -1 "$OUT/tests.log"
step peers 150 && PYTHONPATH=. timeout $(($(left) - 5)) python3 benchmarks/bench_kernels.py --out "$OUT/kernels" \
  --dtypes bf16,fp32 --providers "normpass(ops),torch,inductor(hand),liger" --compile-budget 90 \
  --timer cudagraph >"$OUT/kernels.log" 2>&1
tail -3 "$OUT/kernels.log" 2>/dev/null
echo "done in $(($(date +%s) - start)) s"
