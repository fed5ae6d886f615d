#!/usr/bin/env bash
# An experiment's A/B in one device call (see README.md here): build main, snapshot it as the
# base, apply PATCH in place (several patches: space-separated) and rebuild only what they touch,
# run the kernel tests on the patched build (again with every SWITCH, the patches' runtime switches,
# set), A/B main, the patched build, and the patched build with each switch, then run the full `gpu`
# suite on the base snapshot (main; no rebuild; BASE_TESTS=0 skips it), and memcheck there if
# MEMCHECK_K is set. Each step is skipped when less than its estimate is left of BUDGET_S (default
# 570). Logs go to $OUT.
#
#   PATCH="benchmarks/experiments/NAME.patch ..." [SWITCH="NORMPASS_EXP_NAME=1 ..."] \
#     [DTYPES=bf16,fp32] [NS=...] [MEMCHECK_K="K1;K2"] [BASE_TESTS=0] BUDGET_S=570 \
#     bash benchmarks/experiments/ab_one_call.sh
source "$(dirname "$0")/../device_call.sh"
PATCH=${PATCH:?PATCH names the experiment}
NS=${NS:-1024,4096,8192,12288,16384,65536,262144}
DTYPES=${DTYPES:-bf16}
SWITCH=${SWITCH:-}
BASE_TESTS=${BASE_TESTS:-1}

build_in_place base 200
mkdir -p .snap/base && tar -c --exclude=./.snap --exclude=./build . | tar -x -C .snap/base
for p in $PATCH; do patch -p1 -s <"$p" || exit 1; done
build_in_place new 150
step tests_new 60 && python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_kernels.py \
  >"$OUT/tests_new.log" 2>&1
tail -1 "$OUT/tests_new.log"
variants=(base=.snap/base new=.)
if [ -n "$SWITCH" ]; then
  step tests_switch 60 && env $SWITCH python3 -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_cuda_kernels.py >"$OUT/tests_switch.log" 2>&1
  tail -1 "$OUT/tests_switch.log"
  for s in $SWITCH; do # NORMPASS_EXP_FWD_WIDE=1 -> variant `fwd_wide`
    name=${s%%=*}
    variants+=("$(echo "${name#NORMPASS_EXP_}" | tr '[:upper:]' '[:lower:]')=.:$s")
  done
fi
# The A/B's estimate by its cells: ~1 s each (variant x dtype x N x round, norms together) plus
# start-up (an H100: 84 cells in 94 s, 24 in 53 s); what follows keeps 130 s unless skipped.
cells=$((${#variants[@]} * $(echo "$DTYPES" | tr ',' ' ' | wc -w) * $(echo "$NS" | tr ',' ' ' | wc -w) * 2))
reserve=$([ "$BASE_TESTS" = 1 ] && echo 130 || echo 5)
ab ab $((40 + 3 * cells / 2)) "$reserve" --rounds 2 --dtypes "$DTYPES" --ns "$NS" "${variants[@]}"
[ "$BASE_TESTS" = 1 ] && step tests_base 100 && (cd .snap/base && timeout $(($(left) - 5)) \
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/ >"$OUT/tests_base.log" 2>&1)
tail -1 "$OUT/tests_base.log" 2>/dev/null
# MEMCHECK_K="K1;K2": memcheck of main (the base snapshot) too, a process for each expression.
[ -n "${MEMCHECK_K:-}" ] && (cd .snap/base && memcheck memcheck 60 "$MEMCHECK_K")
echo "done in $(($(date +%s) - start)) s"
