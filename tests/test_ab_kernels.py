"""The kernel A/B script's variant specs and its table (the GPU runs themselves are the device's)."""

import argparse
import csv
import pathlib
import sys

import pytest
from expecttest import assert_expected_inline

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ab_kernels  # noqa: E402


def test_variant_spec():
    v = ab_kernels.parse_variant("off=.:NORMPASS_STAGED=0,X=1")
    assert (v.name, v.env) == ("off", {"NORMPASS_STAGED": "0", "X": "1"})
    assert v.tree == str(pathlib.Path(".").resolve())
    assert ab_kernels.parse_variant("base=/tmp/base").env == {}


@pytest.mark.parametrize("spec", ["noname", "=tree", "a=", "a=.:FLAG"])
def test_bad_variant_spec(spec):
    with pytest.raises(argparse.ArgumentTypeError):
        ab_kernels.parse_variant(spec)


def test_table_from_bench_csv(tmp_path):
    def write(name, rows):
        path = tmp_path / f"{name}.csv"
        with open(path, "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=["dtype", "norm", "n", "provider", "fwd", "fwdbwd"])
            wr.writeheader()
            wr.writerows(rows)
        return ab_kernels.read_cells(str(path))

    def row(norm, n, provider, fwd, fwdbwd):
        return dict(dtype="bf16", norm=norm, n=n, provider=provider, fwd=fwd, fwdbwd=fwdbwd)

    base = write(
        "base",
        [row("rms_norm", 1024, "normpass(ops)", 3.7512, 3.4), row("rms_norm", 1024, "torch", 3.0, 1.5)],
    )
    new = write(
        "new",
        [
            row("rms_norm", 1024, "normpass(ops)", 3.8, "error x"),
            row("add_rms_norm", 1024, "normpass add_rms_norm", 3.9, ""),
        ],
    )
    assert_expected_inline(
        ab_kernels.table([("base", 1, base), ("new", 1, new)]),
        """\
| dtype | norm | N | base r1 | new r1 |
|---|---|---|---|---|
| bf16 | rms_norm | 1024 | 3.75 / 3.40 | 3.80 / err |
| bf16 | add_rms_norm | 1024 | - | 3.90 |""",
    )
