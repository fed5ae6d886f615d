"""The reading of Nsight Compute's per-instruction stall samples (the profiling itself is the device's)."""

import pathlib
import sys

import pytest
from expecttest import assert_expected_inline

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import ncu_kernel  # noqa: E402

HEADER = (
    '"Address","Source","Warp Stall Sampling (All Samples)","Warp Stall Sampling (Not-issued Samples)",'
    '"stall_long_sb","stall_math","stall_wait","stall_long_sb (Not Issued)"'
)


def page(rows):
    """ncu's source page as --csv writes it: the kernel's name, the header, a row per instruction."""
    return ['"Kernel Name","norm_fwd_kernel"', HEADER] + [",".join(f'"{v}"' for v in r) for r in rows]


def test_stalls_ranks_instructions_and_reasons():
    lines = page(
        [
            ("0x0", "LDG.E.128 R8, desc[UR4][R2.64]", "3", "2", "0", "1", "2", "0"),
            ("0x10", "IMAD.U32 R6, R8, 0x10000, RZ", "60", "59", "57", "1", "2", "57"),
            ("0x20", "FADD.FTZ R6, R6, R7", "", "", "", "", "", ""),
            ("0x30", "SHF.L.U32 R9, R12, 0x10, RZ", "37", "36", "30", "5", "2", "30"),
        ]
    )
    assert_expected_inline(
        ncu_kernel.stalls(lines, top=2),
        """\
100 samples; long_sb 87.0%, math 7.0%, wait 6.0%
    1  60.0%  IMAD.U32 R6, R8, 0x10000, RZ                     long_sb:57 wait:2 math:1
    3  37.0%  SHF.L.U32 R9, R12, 0x10, RZ                      long_sb:30 math:5 wait:2""",
    )


def test_stalls_without_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        ncu_kernel.stalls(page([("0x0", "EXIT", "0", "0", "0", "0", "0", "0")]))


DETAILS = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
    '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def details(launches):
    """ncu's details page as --csv writes it after the profiler's own lines: a row per metric."""
    rows = ["==PROF== Disconnected from process 7", DETAILS]
    for launch, kernel, metrics in launches:
        for section, name, unit, value in metrics:
            cells = (launch, "7", "python3", "h", kernel, "1", "7", "(512, 1, 1)", "(4096, 1, 1)", "0", "9.0")
            rows.append(",".join(f'"{v}"' for v in (*cells, section, name, unit, value)))
    return rows


def test_summary_keeps_each_kernels_last_launch():
    sol, launch = "GPU Speed Of Light Throughput", "Launch Statistics"
    runs = {
        "normpass": details(
            [
                (
                    "0",
                    "norm_fwd_kernel",
                    [(sol, "Duration", "us", "99.1"), (launch, "Registers Per Thread", "", "64")],
                ),
                (
                    "1",
                    "norm_fwd_kernel",
                    [(sol, "Duration", "us", "70.2"), (sol, "DRAM Throughput", "%", "91.5")],
                ),
            ]
        ),
        "liger": details([("0", "_rms_norm_forward_kernel", [(sol, "Duration", "us", "66.0")])]),
    }
    assert_expected_inline(
        ncu_kernel.summary(runs),
        """\
| provider | kernel | time | DRAM % | SM % | regs | block | grid | occ % | achieved % | cyc/issue |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| normpass | norm_fwd_kernel | 70.2 us | 91.5 |  |  |  |  |  |  |  |
| liger | _rms_norm_forward_kernel | 66.0 us |  |  |  |  |  |  |  |  |""",
    )


def test_summary_without_a_details_page_is_an_error():
    with pytest.raises(ValueError, match="no ncu details page"):
        ncu_kernel.summary({"liger": ["==PROF== Disconnected from process 7"]})


def test_run_profiles_a_peers_forward_only():
    with pytest.raises(ValueError, match="normpass's backward op only"):
        ncu_kernel.run("rms_norm", 1024, "bf16", backward=True, provider="liger")
    with pytest.raises(ValueError, match="one of normpass, liger, inductor"):
        ncu_kernel.run("rms_norm", 1024, "bf16", provider="apex")
