#!/usr/bin/env bash
# An experiment's A/B in one device call (see README.md here): build main, snapshot it as the
# base, apply PATCH in place and rebuild only what it touches, run the kernel tests on the patched
# build, A/B the two, then run the full `gpu` suite on the base snapshot (main; no rebuild). Each
# step is skipped when less than its estimate is left of BUDGET_S (default 570). Logs go to $OUT.
#
#   PATCH=benchmarks/experiments/NAME.patch [DTYPES=bf16,fp32] [NS=...] BUDGET_S=570 \
#     bash benchmarks/experiments/ab_one_call.sh
source "$(dirname "$0")/../device_call.sh"
PATCH=${PATCH:?PATCH names the experiment}
NS=${NS:-1024,4096,8192,12288,16384,65536,262144}
DTYPES=${DTYPES:-bf16}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step build 200 && python3 benchmarks/ab_kernels.py --build --rounds 0 base=. >"$OUT/build.log" 2>&1 ||
  { tail -20 "$OUT/build.log"; exit 1; }
mkdir -p .snap/base && tar -c --exclude=./.snap --exclude=./build . | tar -x -C .snap/base
patch -p1 -s <"$PATCH" || exit 1
step rebuild 150 && python3 benchmarks/ab_kernels.py --build --rounds 0 new=. >>"$OUT/build.log" 2>&1 ||
  { tail -20 "$OUT/build.log"; exit 1; }
grep "^built" "$OUT/build.log"
step tests_new 60 && python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_kernels.py \
  >"$OUT/tests_new.log" 2>&1
tail -1 "$OUT/tests_new.log"
# The A/B writes its table after every run: a run cut short by the limit still reports.
step ab 250 && timeout $(($(left) - 130)) python3 benchmarks/ab_kernels.py --rounds 2 --dtypes "$DTYPES" \
  --ns "$NS" --out "$OUT/ab" base=.snap/base new=. >"$OUT/ab.log" 2>&1
cat "$OUT/ab/ab.md" 2>/dev/null
step tests_base 100 && (cd .snap/base && timeout $(($(left) - 5)) python3 -m pytest -q -m gpu \
  -p no:cacheprovider tests/ >"$OUT/tests_base.log" 2>&1)
tail -1 "$OUT/tests_base.log" 2>/dev/null
echo "done in $(($(date +%s) - start)) s"
