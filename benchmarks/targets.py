"""Issue #3's targets, checked against a kernel table (bench_kernels.py's bench.csv).

- bf16, N 1024-16384: forward >= 90% of the copy ceiling, forward+backward >= 80%;
- at every N of the table: no slower than the best peer, and no cell under 60% of the ceiling.

bench_kernels.py appends the verdict to bench.md; a table already measured is checked with

    python benchmarks/targets.py bench_out/bench.csv --ceiling 3.03
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterable

TARGET_NS = range(1024, 16384 + 1)
FLOORS = {"fwd": 0.90, "fwdbwd": 0.80}  # bf16 at TARGET_NS
EVERY_N_FLOOR = 0.60
PASSES = {"fwd": "forward", "fwdbwd": "forward+backward"}


def _tbps(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "error ...", "n/a (liger)", "skipped ...", ""
        return None


def misses(rows: Iterable[dict], ceiling: float, ours: str = "normpass") -> list[str]:
    """One line per missed target; an empty list when every target is met.

    `rows` are bench.csv's dicts (dtype, norm, n, provider, fwd, fwdbwd; TB/s or a note); the
    provider whose name starts with `ours` is normpass, every other one a peer.

        >>> misses([{"dtype": "bf16", "norm": "rms_norm", "n": "4096", "provider": "normpass",
        ...          "fwd": "2.5", "fwdbwd": "2.6"}], ceiling=3.0)
        ['bf16 rms_norm 4096 forward: 2.50 TB/s is 83% of the ceiling (target 90%)']
    """
    cells: dict[tuple[str, str, int], dict[str, dict[str, float | None]]] = {}
    for r in rows:
        if r["norm"] not in ("rms_norm", "layer_norm"):
            continue  # add_rms_norm's table has no targets of its own
        key = (r["dtype"], r["norm"], int(r["n"]))
        cells.setdefault(key, {})[r["provider"]] = {p: _tbps(r[p]) for p in PASSES}
    out = []
    for (dtype, norm, n), by_provider in cells.items():
        mine = next((v for p, v in by_provider.items() if p.startswith(ours)), None)
        if mine is None:
            continue
        where = f"{dtype} {norm} {n}"
        for p, label in PASSES.items():
            value = mine[p]
            if value is None:
                out.append(f"{where} {label}: no measurement")
                continue
            floor = FLOORS[p] if dtype == "bf16" and n in TARGET_NS else EVERY_N_FLOOR
            if value < floor * ceiling:
                out.append(
                    f"{where} {label}: {value:.2f} TB/s is {100 * value / ceiling:.0f}% of the ceiling "
                    f"(target {100 * floor:.0f}%)"
                )
            peers = {q: v[p] for q, v in by_provider.items() if not q.startswith(ours) and v[p] is not None}
            if peers:
                best = max(peers, key=peers.get)
                if peers[best] > value:
                    lead = 100 * (peers[best] / value - 1)
                    out.append(f"{where} {label}: {value:.2f} TB/s, {best} {peers[best]:.2f} (+{lead:.1f}%)")
    return out


def verdict(rows: Iterable[dict], ceiling: float) -> str:
    """Markdown: the targets and what misses them."""
    missed = misses(rows, ceiling)
    head = "### Issue #3's targets\n\n"
    if not missed:
        return head + "Every target met.\n"
    return head + f"{len(missed)} missed:\n\n" + "".join(f"- {m}\n" for m in missed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="bench.csv of bench_kernels.py")
    ap.add_argument("--ceiling", type=float, required=True, help="the run's copy ceiling, TB/s")
    args = ap.parse_args()
    if args.ceiling <= 0:
        ap.error("--ceiling must be positive")
    with open(args.csv, newline="") as f:
        print(verdict(csv.DictReader(f), args.ceiling), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
