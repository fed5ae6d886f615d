"""The `normpass` command: demo end to end on CPU, explain on a user file, bench, argument errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import normpass
from normpass import cli, demo_model

TINY_DEMO = ["--device", "cpu", "--layers", "1", "--hidden", "32", "--heads", "2", "--vocab", "64"]
TINY_DEMO += ["--batch", "2", "--seq", "8", "--steps", "2", "--compiler", "eager"]


def test_demo_runs_end_to_end_on_cpu(capsys):
    assert cli.main(["demo", *TINY_DEMO]) == 0
    out, err = capsys.readouterr()
    assert "normpass demo: transformers" in out and "LlamaForCausalLM, 1 layers, hidden 32" in out
    assert "1. Norm sites (normpass.explain, policy=fuse)" in out
    assert "normpass report (policy=fuse): 3 site(s)" in out  # two per layer and the final norm
    assert "max |normpass + eager - original|" in out and "-> OK" in out
    assert "the backend rewrote" in out
    table = out[out.index("4. Timings") :]
    assert "eager (original)" in table and "normpass + eager" in table and "vs eager" in table
    # the progress bars: each variant's first call, then the timed rounds (every variant once per round)
    assert "eager (original): first call" in err and "normpass + eager: first call" in err
    assert "timed rounds" in err and "[##############################] 2/2" in err


def test_demo_times_training_steps(capsys):
    assert cli.main(["demo", *TINY_DEMO, "--train", "--policy", "rmsnorm"]) == 0
    out = capsys.readouterr().out
    assert "2. Timing (forward + backward;" in out and "4. Timings (ms per forward + backward step;" in out
    assert "-> n/a (this policy changes the function)" in out


def test_demo_says_what_failed(monkeypatch, capsys):
    class Broken:
        reports: list = []

        def __call__(self, gm, example_inputs):
            raise RuntimeError("no kernel for this")

    monkeypatch.setattr(normpass, "backend", lambda **options: Broken())
    assert cli.main(["demo", *TINY_DEMO]) == 1
    out = capsys.readouterr().out
    assert "normpass + eager failed: BackendCompilerFailed" in out and "no kernel for this" in out
    table = out[out.index("4. Timings") :]
    assert "eager (original)" in table and "normpass + eager" not in table


def test_demo_defaults_use_inductor():
    args = cli.make_parser().parse_args(["demo"])
    assert (args.compiler, args.policy, args.steps, args.train) == ("inductor", "fuse", 10, False)


def test_demo_model_without_transformers():
    model, what = demo_model.build(layers=2, hidden=32, heads=2, vocab=64, use_transformers=False)
    assert what == "normpass.demo_model.TinyLlama"
    ids = torch.randint(0, 64, (2, 8))
    assert model(ids).shape == (2, 8, 64)
    report = normpass.explain(model, ids)
    assert len(report) == 5 and all(r.form.startswith("R1") for r in report.rows)  # Llama's upcast form


def test_python_dash_m():
    result = subprocess.run(
        [sys.executable, "-m", "normpass", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and "{demo,explain,bench}" in result.stdout


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(
        textwrap.dedent(
            """
            import torch

            class Net(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = torch.nn.Linear(16, 16)
                    self.ln = torch.nn.LayerNorm(16)

                def forward(self, x):
                    h = self.fc(x)
                    return self.ln(h) + h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

            def with_inputs():
                return Net(), torch.randn(2, 4, 16)

            def model_only():
                return Net()

            def not_a_model():
                return 42

            class SameDtypeNet(Net):
                def forward(self, x):
                    if x.dtype != self.fc.weight.dtype:
                        raise TypeError(f"input {x.dtype}, weights {self.fc.weight.dtype}")
                    return super().forward(x)

            def same_dtype():
                return SameDtypeNet()

            class ImportsWhenRun(Net):
                def forward(self, x):
                    import my_neighbor  # imported while explain traces the model

                    return super().forward(x)

            def imports_when_run():
                return ImportsWhenRun()

            def changes_directory():
                import os

                os.chdir(os.path.dirname(os.path.abspath(__file__)) + "/..")
                return Net()

            def imports_when_called():
                import my_neighbor  # next to this file; imported only when the factory runs

                return my_neighbor.Net()

            NOT_CALLABLE = 1
            """
        )
    )
    (tmp_path / "my_neighbor.py").write_text("from my_models import Net\n")
    return path


def test_explain_with_example_inputs(user_file, capsys):
    assert cli.main(["explain", f"{user_file}:with_inputs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("normpass report (policy=fuse): 2 site(s)")
    assert "ln" in out


def test_explain_model_only_needs_shape(user_file, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["explain", f"{user_file}:model_only"])
    assert exc.value.code == 2
    assert "returned only a model: give --shape (e.g. --shape 2,16,64)" in capsys.readouterr().err
    assert cli.main(["explain", f"{user_file}:model_only", "--shape", "3,16", "--policy", "rmsnorm"]) == 0
    assert capsys.readouterr().out.startswith("normpass report (policy=rmsnorm): 2 site(s)")


def test_explain_model_only_runs_in_dtype(user_file, capsys):
    # Before, --dtype cast only the input: the model stayed float32.
    argv = ["explain", f"{user_file}:same_dtype", "--shape", "2,16", "--dtype", "bfloat16"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("normpass report (policy=fuse): 2 site(s)")


@pytest.mark.parametrize("factory", ["imports_when_called", "imports_when_run", "changes_directory"])
def test_explain_keeps_the_files_folder_importable(factory, user_file, capsys, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    for module in ("my_neighbor", "my_models"):  # imported afresh, from the file's folder
        monkeypatch.delitem(sys.modules, module, raising=False)
    path_before = list(sys.path)
    assert cli.main(["explain", f"{user_file.name}:{factory}", "--shape", "2,16"]) == 0
    assert capsys.readouterr().out.startswith("normpass report (policy=fuse): 2 site(s)")
    assert sys.path == path_before


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["explain", "my_models.py"],
            "expected FILE.py:FACTORY (e.g. models.py:make_model), got 'my_models.py'",
        ),
        (["explain", "{file}:"], "expected FILE.py:FACTORY"),
        (["explain", "{file}:not-a-name"], "expected FILE.py:FACTORY"),
        (["explain", "missing.py:make"], "missing.py: no such file"),
        (["explain", "{file}:nope"], "has no function 'nope'"),
        (["explain", "{file}:NOT_CALLABLE"], "has no function 'NOT_CALLABLE'"),
        (["explain", "{file}:not_a_model"], "returned int; expected a model or (model, example_inputs)"),
        (["explain", "{file}:model_only", "--shape", "2,x"], "expected comma-separated positive ints"),
        (["explain", "{file}:model_only", "--shape", "0,4"], "expected comma-separated positive ints"),
        (["explain", "{file}:with_inputs", "--policy", "fast"], "invalid choice: 'fast'"),
        (["explain", "{file}:with_inputs", "--shape", "2,16"], "--shape is for a FACTORY that returns only"),
        (["explain", "{file}:with_inputs", "--dtype", "float16"], "--dtype is for a FACTORY that"),
        (["demo", "--hidden", "30", "--heads", "4"], "--hidden (30) must be a multiple of --heads (4)"),
        (["demo", "--layers", "0"], "--layers must be positive"),
        (["demo", "--compiler", "tvm"], "invalid choice: 'tvm'"),
        (["demo", "--device", "gpu"], "--device gpu: Expected one of"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_arguments(argv, message, user_file, capsys):
    argv = [a.format(file=user_file) for a in argv]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage: normpass" in err


def test_bench_passes_arguments_through(tmp_path, monkeypatch, capfd):
    script = tmp_path / "bench_kernels.py"
    script.write_text("import sys\nprint('bench args', sys.argv[1:])\nsys.exit(3)\n")
    monkeypatch.setattr(cli, "BENCH_SCRIPT", script)
    assert cli.main(["bench", "--", "--dtype", "bf16", "-n", "5"]) == 3
    assert "bench args ['--dtype', 'bf16', '-n', '5']" in capfd.readouterr().out


def test_bench_without_the_script(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "BENCH_SCRIPT", tmp_path / "bench_kernels.py")
    assert cli.main(["bench"]) == 1
    assert "bench_kernels.py is not here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cuda", "device", "expected"),
    [(False, None, "cpu"), (True, None, "cuda"), (True, "cpu", "cpu"), (False, "meta", "meta")],
)
def test_demo_sizes_follow_the_device(monkeypatch, cuda, device, expected):
    """A GPU demo defaults to sizes where the norms matter, any other device to the small ones; a
    flag given wins on either."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    seen = []
    monkeypatch.setattr(cli, "demo", lambda args: seen.append(args) or 0)
    assert cli.main(["demo", "--seq", "64", *(["--device", device] if device else [])]) == 0
    (args,) = seen
    assert args.device == expected and args.seq == 64
    assert (args.hidden, args.heads, args.batch) == ((2048, 16, 4) if expected == "cuda" else (256, 4, 4))


def test_demo_times_variants_in_rounds():
    """Timed calls alternate between the variants, so a machine's drift falls on all of them alike; a
    variant that fails mid-way is reported and leaves the table."""
    calls = []

    def variant(name, fails_at=None):
        def step():
            calls.append(name)
            if calls.count(name) == fails_at:
                raise RuntimeError(f"{name} broke")
            return name

        return name, step

    variants = [variant("a"), variant("b"), variant("c", fails_at=2)]
    timings, outputs, failed = cli._time(variants, 3, torch.device("cpu"))
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["a", "b"] * 2
    assert [(label, len(times)) for label, _, times in timings] == [("a", 3), ("b", 3)]
    assert outputs == {"a": "a", "b": "b"}  # c's first result is not checked against the others
    assert failed == ["   c failed: RuntimeError: c broke"]
