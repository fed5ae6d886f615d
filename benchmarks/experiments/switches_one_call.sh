#!/usr/bin/env bash
# The forward launch switches' A/B in one device call (benchmarks/NOTES.md, Next 00): apply
# fwd_launch_switches.patch, build once, compare each switch with the switches off in the same run
# (three short A/Bs, each at the N it is about), run the kernel tests with the new layouts on, then
# take the peer table by the CUDA-graph timer. Each step is skipped when less than its estimate is
# left of BUDGET_S (default 570). Logs go to $OUT.
#
#   BUDGET_S=570 bash benchmarks/experiments/switches_one_call.sh
source "$(dirname "$0")/../device_call.sh"

patch -p1 -s <benchmarks/experiments/fwd_launch_switches.patch || exit 1
build_in_place base 200
# About 3 s per N, dtype, variant and round.
ab tiles_bf16 130 20 --rounds 2 --dtypes bf16 --ns 32768,40960,49152,65536,98304,131072,262144 \
  base=. one=.:NORMPASS_EXP_FWD_ONE_TILE=1 four=.:NORMPASS_EXP_FWD_TILES=4
ab tiles_fp32 60 20 --rounds 2 --dtypes fp32 --ns 16384,20480,24576,32768,65536 \
  base=. one=.:NORMPASS_EXP_FWD_ONE_TILE=1
ab waves 40 20 --rounds 2 --dtypes bf16 --ns 256,1024,4096 base=. waves=.:NORMPASS_EXP_FWD_WAVES=4
# Both new layouts at once: one tile for clusters of 3-8, four tiles for the other cluster rows.
step tests 60 && NORMPASS_EXP_FWD_ONE_TILE=1 NORMPASS_EXP_FWD_TILES=4 python3 -m pytest -q -m gpu \
  -p no:cacheprovider tests/test_cuda_kernels.py >"$OUT/tests.log" 2>&1
tail -1 "$OUT/tests.log"
step peers 150 && PYTHONPATH=. timeout $(($(left) - 5)) python3 benchmarks/bench_kernels.py --out "$OUT/kernels" \
  --dtypes bf16,fp32 --providers "normpass(ops),torch,inductor(hand),liger" --compile-budget 90 \
  --timer cudagraph >"$OUT/kernels.log" 2>&1
tail -3 "$OUT/kernels.log" 2>/dev/null
echo "done in $(($(date +%s) - start)) s"
