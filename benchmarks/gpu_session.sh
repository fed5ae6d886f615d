#!/usr/bin/env bash
# One call on a lent GPU machine (no network; torch preinstalled): build normpass against that
# torch, then run the named steps in order, each skipped when less than its estimate is left of
# BUDGET_S seconds (default 570: a device call is cut at 600). Logs go to $OUT (default gpu_out).
#
#   bash benchmarks/gpu_session.sh tests memcheck kernels e2e
#
#   tests     the `gpu` tests (TESTS_K: a pytest -k expression)          -> tests.log
#   memcheck  compute-sanitizer memcheck of the kernel tests in MEMCHECK_K ("K1;K2": a process for
#             each), each test's CUDA memory (cuda_memory_report.py) -> memcheck*.log
#   kernels   bench_kernels.py, copy ceiling in the same run (KERNEL_ARGS) -> kernels/
#   dtypes    bench_grad_dtype.py: outputs and gradients of another dtype than x's -> dtypes.log
#   e2e       bench_e2e.py, the Llama step in bf16 and under autocast       -> e2e/, e2e_amp/
#   ncu       the forward of normpass, Liger and inductor under Nsight Compute at NCU_CASE
#             ("norm N dtype", default "rms_norm 16384 bf16"), one table (ncu_kernel.py) -> ncu.md
#   stalls    where one normpass kernel's warps wait: ncu's per-instruction stall samples of its
#             second launch at NCU_CASE (default "layer_norm 262144 bf16"), the backward unless
#             STALLS_KERNEL=fwd (ncu_kernel.py stalls)                  -> stalls.md, stalls.ncu-rep
#   ab        ab_kernels.py with AB_ARGS (variants of this build by their environment, e.g.
#             "base=. on=.:NAME=1" for a runtime switch; see benchmarks/experiments/) -> ab/, ab.log
source "$(dirname "$0")/device_call.sh"

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

step build 200 || exit 1
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"
  exit 1
fi
echo "built in $(($(date +%s) - start)) s"

for name in "$@"; do
  case $name in
  tests)
    step tests 120 && python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} \
      tests/ >"$OUT/tests.log" 2>&1
    tail -5 "$OUT/tests.log" ;;
  memcheck) memcheck memcheck 150 "${MEMCHECK_K:-16_bit or extra_grad_outs}" ;;
  kernels)
    step kernels 240 && python3 benchmarks/bench_kernels.py --out "$OUT/kernels" \
      ${KERNEL_ARGS:-} >"$OUT/kernels.log" 2>&1
    tail -1 "$OUT/kernels.log"
    sed -n "/^### Issue #3's targets/,\$p" "$OUT/kernels/bench.md" 2>/dev/null ;;
  dtypes)
    step dtypes 120 && python3 benchmarks/bench_grad_dtype.py >"$OUT/dtypes.log" 2>&1
    tail -3 "$OUT/dtypes.log" ;;
  e2e)
    step e2e 200 && python3 benchmarks/bench_e2e.py --models llama --variants inductor,normpass+inductor \
      --out "$OUT/e2e" >"$OUT/e2e.log" 2>&1
    step e2e_amp 150 && python3 benchmarks/bench_e2e.py --models llama --amp \
      --variants inductor,normpass+inductor --out "$OUT/e2e_amp" >"$OUT/e2e_amp.log" 2>&1
    tail -8 "$OUT"/e2e*.log ;;
  ncu)
    step ncu 120 || continue
    read -r norm n dt <<<"${NCU_CASE:-rms_norm 16384 bf16}"
    mkdir -p "$OUT/ncu"
    for p in normpass liger inductor; do
      ncu --clock-control none --nvtx --nvtx-include "profile/" --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section WarpStateStats --csv python3 benchmarks/ncu_kernel.py run \
        "$norm" "$n" --dtype "$dt" --provider $p >"$OUT/ncu/$p.csv" 2>"$OUT/ncu/$p.err"
    done
    python3 benchmarks/ncu_kernel.py summary "$OUT"/ncu/{normpass,liger,inductor}.csv | tee "$OUT/ncu.md" ;;
  stalls)
    step stalls 120 || continue
    read -r norm n dt <<<"${NCU_CASE:-layer_norm 262144 bf16}"
    kernel=${STALLS_KERNEL:-bwd}
    backward=$([ "$kernel" = bwd ] && echo --backward)
    ncu --clock-control none --kernel-name "regex:norm_$kernel" --launch-skip 1 --launch-count 1 \
      --section WarpStateStats --section SourceCounters -f -o "$OUT/stalls" python3 \
      benchmarks/ncu_kernel.py run "$norm" "$n" --dtype "$dt" $backward \
      >"$OUT/stalls.log" 2>&1
    ncu -i "$OUT/stalls.ncu-rep" --page source --csv --print-source sass >"$OUT/stalls.csv" &&
      python3 benchmarks/ncu_kernel.py stalls "$OUT/stalls.csv" | tee "$OUT/stalls.md" ;;
  ab) ab ab 200 0 ${AB_ARGS:?AB_ARGS names the variants} ;;
  *) echo "unknown step $name" && exit 2 ;;
  esac
done
echo "done in $(($(date +%s) - start)) s"
