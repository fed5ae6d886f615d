"""The op schemas, for the pure-PyTorch fallback when the C++ extension is missing.

csrc/ops.cpp defines the same schemas with TORCH_LIBRARY; tests/test_ops_registration.py checks
that the two agree.
"""

SCHEMAS = {
    "rms_norm": "(Tensor input, Tensor? weight, float eps, Tensor? bias=None, *, int normalized_ndim=1, "
    "float weight_offset=0., float p=1., ScalarType? out_dtype=None) -> Tensor",
    "layer_norm": "(Tensor input, Tensor? weight, Tensor? bias, float eps, *, int normalized_ndim=1, "
    "float weight_offset=0., ScalarType? out_dtype=None) -> Tensor",
    "add_rms_norm": "(Tensor input, Tensor residual, Tensor? weight, float eps, Tensor? bias=None, *, "
    "int normalized_ndim=1, float weight_offset=0., float p=1., ScalarType? out_dtype=None) "
    "-> (Tensor, Tensor)",
    "add_layer_norm": "(Tensor input, Tensor residual, Tensor? weight, Tensor? bias, float eps, *, "
    "int normalized_ndim=1, float weight_offset=0., ScalarType? out_dtype=None) -> (Tensor, Tensor)",
    "norm_with_stats": "(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float eps, *, "
    "bool center, int normalized_ndim=1, float weight_offset=0., float p=1., ScalarType? out_dtype=None) "
    "-> (Tensor, Tensor, Tensor)",
    "rms_norm_backward": "(Tensor grad_out, Tensor input, Tensor? weight, Tensor? grad_sum, float eps, "
    "Tensor[]? extra_grad_outs=None, Tensor? stats=None, *, bool has_bias, int normalized_ndim, "
    "float weight_offset, float p, bool weight_grad=True) -> (Tensor, Tensor, Tensor)",
    "layer_norm_backward": "(Tensor grad_out, Tensor input, Tensor? weight, Tensor? grad_sum, float eps, "
    "Tensor[]? extra_grad_outs=None, Tensor? stats=None, *, bool has_bias, int normalized_ndim, "
    "float weight_offset, bool weight_grad=True) -> (Tensor, Tensor, Tensor)",
}
