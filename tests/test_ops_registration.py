"""The C++ op library and its pure-PyTorch fallback register the same ops."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import normpass
from normpass._schemas import SCHEMAS


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cpp_schema_matches_python(name):
    registered = getattr(torch.ops.normpass, name).default._schema
    expected = torch._C.parse_schema(f"normpass::{name}{SCHEMAS[name]}")
    assert str(registered) == str(expected)


def test_no_other_ops_registered():
    # The dispatcher's list, not dir(torch.ops.normpass): that one only holds the ops looked up so far.
    registered = {
        name.removeprefix("normpass::").split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("normpass::")
    }
    assert registered == set(SCHEMAS)


def test_compiled_kernels_in_use():
    assert normpass.FALLBACK_REASON is None
    # The CPU kernel, not a composite, serves CPU tensors.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("normpass::rms_norm", "CPU")


def test_forced_reference_fallback():
    """NORMPASS_FORCE_REFERENCE=1: one warning naming the reason; the ops exist, run and match."""
    code = textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import normpass
        import torch
        from normpass import reference
        from normpass._schemas import SCHEMAS

        ours = [w for w in caught if "normpass" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert "NORMPASS_FORCE_REFERENCE=1" in str(ours[0].message), ours[0].message
        assert normpass.FALLBACK_REASON == "NORMPASS_FORCE_REFERENCE=1 is set"
        for name, schema in SCHEMAS.items():
            got = getattr(torch.ops.normpass, name).default._schema
            assert str(got) == str(torch._C.parse_schema("normpass::" + name + schema)), name
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("normpass::rms_norm", "CPU")

        x, r = torch.randn(4, 16), torch.randn(4, 16)
        w, b = torch.randn(16), torch.randn(16)
        ops = torch.ops.normpass
        torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), reference.norm(x, w, None, 1e-6, center=False))
        torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-6), reference.norm(x, w, b, 1e-6, center=True))
        y, s = ops.add_rms_norm(x, r, w, 1e-6)
        torch.testing.assert_close(s, x + r)
        torch.testing.assert_close(y, reference.norm(x + r, w, None, 1e-6, center=False))
        xg = x.clone().requires_grad_()
        ops.layer_norm(xg, w, b, 1e-6).sum().backward()
        assert xg.grad is not None
        print("ok")
        """
    )
    env = dict(os.environ, NORMPASS_FORCE_REFERENCE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _forward_outputs(x, r, w, b):
    ops = torch.ops.normpass
    return [
        ops.rms_norm(x, w, 1e-6, b),
        ops.layer_norm(x, w, b, 1e-6),
        *ops.add_rms_norm(x, r, w, 1e-6, b),
        *ops.add_layer_norm(x, r, w, b, 1e-6),
    ]


@pytest.mark.skipif(normpass.FALLBACK_REASON is not None, reason="the C++ autograd comes with the extension")
def test_forward_and_backward_run_no_python():
    """The forward ops' autograd is csrc/autograd.cpp's: forward and an ordinary backward call no Python
    of torch.library's autograd or of normpass (the Python formula cost ~100 us of host time a call)."""
    x, r = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    outs = _forward_outputs(x, r, w, b)  # warm up
    for out in outs:
        assert out.grad_fn.name() == "torch::autograd::CppNode<normpass::NormFunction>"

    called = set()

    def profile(frame, event, arg):
        if event == "call":
            called.add(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        outs = _forward_outputs(x, r, w, b)
        torch.autograd.grad(outs, (x, r, w, b), [torch.randn_like(o) for o in outs])
    finally:
        sys.setprofile(None)
    python_autograd = {f for f in called if "_library" in f or os.sep + "normpass" + os.sep in f}
    assert not python_autograd
    saw_grad = any(f.endswith(os.path.join("torch", "autograd", "__init__.py")) for f in called)
    assert saw_grad  # the profiler did see Python calls
