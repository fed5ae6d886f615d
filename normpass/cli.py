"""The `normpass` command: `normpass demo`, `normpass explain FILE.py:FACTORY`, `normpass bench`.

Also runnable as `python -m normpass ...`.

    normpass demo                                # a small Llama: sites found, outputs checked, timings
    normpass demo --compiler eager --steps 5     # no inductor (fast on a small CPU)
    normpass demo --train                        # time forward + backward
    normpass explain my_model.py:make_model --shape 2,16,64
    normpass bench -- --help                     # benchmarks/bench_kernels.py, arguments passed through

`explain`'s FACTORY contract: a function of no arguments, defined in FILE.py, that returns either
`model` or `(model, example_inputs)`, where example_inputs is a tensor or a tuple of positional
inputs. When it returns only a model, `--shape` (e.g. `--shape 2,16,64`) gives the shape of one
random input, and `--dtype` the dtype of that input and of the model (without it: a float32 input,
the model as it is).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POLICIES = ("fuse", "low_precision", "rmsnorm", "prmsnorm")
# The demo's model and batch: small on a CPU; on a GPU, sizes where the norms are worth fusing (at
# hidden 256 and 512 tokens a step is a few launches per layer, which only the host's overhead times).
DEMO_SIZES = {
    "cpu": dict(layers=2, hidden=256, heads=4, vocab=512, batch=4, seq=128),
    "cuda": dict(layers=2, hidden=2048, heads=16, vocab=512, batch=4, seq=2048),
}
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_kernels.py"


# ---- small helpers -------------------------------------------------------------------------------------


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


class Progress:
    """A one-line text progress bar on stderr: `label [#####.....] 5/10`.

    On a terminal it redraws in place; otherwise (a log file, a pipe) it writes the final line only.
    """

    def __init__(self, label: str, total: int, width: int = 30) -> None:
        self.label, self.total, self.width = label, total, width
        self.live = sys.stderr.isatty()
        self.done = 0
        self.update(0)

    def _draw(self) -> None:
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        sys.stderr.write(f"\r  {self.label:<24} [{bar}] {self.done}/{self.total}")
        sys.stderr.flush()

    def update(self, done: int) -> None:
        self.done = done
        if self.live:
            self._draw()

    def close(self) -> None:
        if not self.live:
            self._draw()
        sys.stderr.write("\n")
        sys.stderr.flush()


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 2,16,64, got {text!r}")
    return shape


# ---- demo ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    variants: Sequence[tuple[str, Callable[[], Any]]], steps: int, device: torch.device
) -> tuple[list[tuple[str, float, list[float]]], dict[str, Any], list[str]]:
    """Times each variant's first call (which compiles), then `steps` rounds that call every variant
    once, so that a busy machine's drift falls on all of them alike. Returns (label, seconds of the
    first call, seconds of each timed call) per variant that ran, each one's last result, and a line
    per variant that failed."""

    times: dict[str, list[float]] = {}  # per variant still running: its first call, then the timed ones
    outputs: dict[str, Any] = {}
    failed: list[str] = []

    def run(label: str, fn: Callable[[], Any]) -> bool:
        try:
            start = time.perf_counter()
            outputs[label] = fn()
            _sync(device)
        except Exception as e:  # say what failed, go on with the others; no output of it is checked
            outputs.pop(label, None)
            times.pop(label, None)
            failed.append(f"   {label} failed: {_describe(e)}")
            return False
        times.setdefault(label, []).append(time.perf_counter() - start)
        return True

    for label, fn in variants:
        bar = Progress(f"{label}: first call", 1)
        if run(label, fn):
            bar.update(1)
        bar.close()
    bar = Progress("timed rounds", steps)
    for i in range(steps):
        for label, fn in variants:
            if label in times:
                run(label, fn)
        bar.update(i + 1)
    bar.close()
    return [(label, t[0], t[1:]) for label, t in times.items()], outputs, failed


def _training_step(model: torch.nn.Module, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        out = forward()
        out.float().square().mean().backward()
        return out.detach()

    return step


def _header(args: argparse.Namespace, what: str, model: torch.nn.Module, dtype, device) -> str:
    import normpass

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    n_params = sum(p.numel() for p in model.parameters())
    kernels = (
        f"reference fallback ({normpass.FALLBACK_REASON})"
        if normpass.FALLBACK_REASON
        else "compiled (normpass._C)"
    )
    return (
        f"normpass demo: {what}, {args.layers} layers, hidden {args.hidden}, {n_params / 1e6:.2f}M params, "
        f"batch {args.batch} x seq {args.seq}, {str(dtype).removeprefix('torch.')} on {where}\n"
        f"torch {torch.__version__}; normpass kernels: {kernels}"
    )


def _check_outputs(
    label: str, out: torch.Tensor, original: torch.Tensor, reference: torch.Tensor, policy: str
):
    """Lines comparing `out` with the original and float64, and whether it keeps the policy's promise."""
    out, original = out.float(), original.float()
    err, err_orig = ((t - reference).abs().max().item() for t in (out, original))
    if policy in ("rmsnorm", "prmsnorm"):
        verdict, ok = "n/a (this policy changes the function)", True
    else:  # the tests' promise: no further from float64 than the original, plus a margin
        ok = err <= 2 * err_orig + 1e-5 * reference.abs().max().item()
        verdict = "OK" if ok else "MISMATCH"
    lines = [
        f"   max |{label} - original| = {(out - original).abs().max().item():.3g}",
        f"   max |output - float64 reference|: original {err_orig:.3g}, {label} {err:.3g} -> {verdict}",
    ]
    return lines, ok


def _describe(e: BaseException) -> str:
    """One line for an exception; a torch.compile backend failure is described by its cause."""
    cause = getattr(e, "inner_exception", None) or e
    first = next((line for line in str(cause).splitlines() if line.strip()), "")
    return (
        f"{type(e).__name__}: {type(cause).__name__}: {first}"
        if cause is not e
        else f"{type(e).__name__}: {first}"
    )


def demo(args: argparse.Namespace) -> int:
    import normpass
    from normpass import demo_model

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    model, what = demo_model.build(args.layers, args.hidden, args.heads, args.vocab)
    model = model.to(device=device, dtype=dtype)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    _say(_header(args, what, model, dtype, device))

    _say("", f"1. Norm sites (normpass.explain, policy={args.policy})")
    try:
        _say(str(normpass.explain(model, x, policy=args.policy)))
    except Exception as e:  # the report informs; the rest of the demo still runs
        _say(f"   explain failed: {_describe(e)}")

    variants: list[tuple[str, Callable[[], Any]]] = [("eager (original)", lambda: model(x))]
    if args.compiler == "inductor":
        original_inductor = torch.compile(model)
        variants.append(("inductor (original)", lambda: original_inductor(x)))
    be = normpass.backend(compiler=args.compiler, policy=args.policy)  # keeps the rewrite reports
    fused = torch.compile(model, backend=be)
    variants.append((f"normpass + {args.compiler}", lambda: fused(x)))

    what_step = "forward + backward" if args.train else "forward"
    _say(
        "",
        f"2. Timing ({what_step}{'' if args.train else ' under no_grad'}; the first call compiles, "
        f"then {args.steps} timed rounds of one step per variant)",
    )
    with torch.set_grad_enabled(args.train):
        steps = [(label, _training_step(model, fn) if args.train else fn) for label, fn in variants]
        timings, outputs, failed = _time(steps, args.steps, device)
    with torch.no_grad():
        reference = copy.deepcopy(model).to(torch.float64)(x)
    if failed:
        _say("", *failed)

    _say("", f"3. Outputs on the same input (policy={args.policy}, compiler={args.compiler})")
    all_ok = True
    for label, out in outputs.items():
        if label.startswith("normpass") and "eager (original)" in outputs:
            lines, ok = _check_outputs(label, out, outputs["eager (original)"], reference, args.policy)
            all_ok &= ok
            _say(*lines)
    if be.reports:  # one per graph Dynamo handed to the backend
        rewritten, sites = sum(len(r.rewritten) for r in be.reports), sum(len(r) for r in be.reports)
        _say(f"   the backend rewrote {rewritten} of {sites} site(s) in {len(be.reports)} graph(s)")

    _say("", f"4. Timings (ms per {what_step} step; a busy machine shows as min far below median)")
    median = {label: statistics.median(t) if t else float("nan") for label, _, t in timings}
    eager = median.get("eager (original)", float("nan"))
    rows = [
        (label, f"{first:.2f}", f"{median[label] * 1e3:.3f}", f"{min(t, default=float('nan')) * 1e3:.3f}",
         f"{eager / median[label]:.2f}x")
        for label, first, t in timings
    ]  # fmt: skip
    _say(_table(("variant", "first call (s)", "median", "min", "vs eager"), rows))
    if "inductor (original)" in median and "normpass + inductor" in median:
        speedup = median["inductor (original)"] / median["normpass + inductor"]
        _say(f"normpass + inductor vs inductor alone: {speedup:.2f}x (median)")
    return 0 if all_ok and not failed else 1


# ---- explain -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _importable(folder: str) -> Iterator[None]:
    """`folder` first on sys.path, then removed again (if the code it ran has not removed it)."""
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        if folder in sys.path:
            sys.path.remove(folder)


def _call_factory(spec: str, parser: argparse.ArgumentParser) -> Any:
    """Imports FILE.py and returns FACTORY(); the caller keeps the file's folder importable
    (`_importable`) while it runs the factory and the model."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name.isidentifier():
        parser.error(f"expected FILE.py:FACTORY (e.g. models.py:make_model), got {spec!r}")
    file = Path(path)
    if not file.is_file():
        parser.error(f"{path}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"normpass_user_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        parser.error(f"{path}: cannot import it as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    factory = getattr(module, name, None)
    if not callable(factory):
        parser.error(f"{path} has no function {name!r}")
    return factory()


def explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # The file's folder stays importable while the factory and the traced model run: both may
    # import the file's neighbors when called.
    path = Path(args.spec.rpartition(":")[0])
    with _importable(str(path.resolve().parent)):
        return _explain(args, parser)


def _explain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    made = _call_factory(args.spec, parser)
    model, inputs = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not isinstance(model, torch.nn.Module):
        parser.error(
            f"{args.spec} returned {type(made).__name__}; expected a model or (model, example_inputs)"
        )
    if inputs is None:
        if args.shape is None:
            parser.error(
                f"{args.spec} returned only a model: give --shape (e.g. --shape 2,16,64) for a random input"
            )
        if args.dtype is not None:  # the model runs in the input's dtype, as in the demo
            model = model.to(DTYPES[args.dtype])
        inputs = (torch.randn(args.shape, dtype=DTYPES[args.dtype or "float32"]),)
    else:
        # Silently unused flags would report on other inputs than the user asked for.
        for flag in ("shape", "dtype"):
            if getattr(args, flag) is not None:
                parser.error(
                    f"--{flag} is for a FACTORY that returns only a model; {args.spec} returns inputs too"
                )
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
    import normpass

    print(normpass.explain(model, *inputs, policy=args.policy))
    return 0


# ---- bench ---------------------------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> int:
    if not BENCH_SCRIPT.is_file():
        print(
            f"normpass bench: {BENCH_SCRIPT} is not here. It ships with the source tree, not the wheel: "
            "run it from a clone of the repository.",
            file=sys.stderr,
        )
        return 1
    extra = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *extra])


# ---- entry point ---------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normpass", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,explain,bench}")

    d = sub.add_parser("demo", help="a small Llama: norm sites found, outputs checked, timings")
    d.add_argument("--device", help="cpu or cuda[:N] (default: cuda when there is one)")
    d.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on cuda, float32 on cpu")
    for flag in DEMO_SIZES["cpu"]:
        cpu, cuda = (DEMO_SIZES[kind][flag] for kind in ("cpu", "cuda"))
        d.add_argument(f"--{flag}", type=int, help=f"default: {cpu} on cpu, {cuda} on cuda")
    d.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    d.add_argument("--train", action="store_true", help="time forward + backward instead of forward only")
    d.add_argument(
        "--compiler", default="inductor", choices=("inductor", "eager"), help="normpass's inner compiler"
    )
    d.add_argument("--policy", default="fuse", choices=POLICIES)

    e = sub.add_parser("explain", help="the report for a model you define: FILE.py:FACTORY")
    e.add_argument(
        "spec", metavar="FILE.py:FACTORY", help="FACTORY() returns model or (model, example_inputs)"
    )
    e.add_argument(
        "--shape", type=_parse_shape, help="shape of a random input, when FACTORY returns only a model"
    )
    e.add_argument(
        "--dtype", choices=DTYPES, help="dtype of that random input and of the model (default: float32 input)"
    )
    e.add_argument("--policy", default="fuse", choices=POLICIES)

    b = sub.add_parser(
        "bench", help="the kernel benchmark (benchmarks/bench_kernels.py; arguments passed through)"
    )
    b.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(args.device).type
        except RuntimeError as e:
            parser.error(f"--device {args.device}: {e}")
        if kind == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        for flag, default in DEMO_SIZES["cuda" if kind == "cuda" else "cpu"].items():
            if getattr(args, flag) is None:
                setattr(args, flag, default)
            if getattr(args, flag) <= 0:
                parser.error(f"--{flag} must be positive")
        if args.steps < 0:
            parser.error("--steps must be >= 0")
        if args.hidden % args.heads:
            parser.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
        return demo(args)
    if args.command == "explain":
        return explain(args, parser)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
