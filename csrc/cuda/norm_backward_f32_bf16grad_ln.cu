// The LayerNorm backward kernels for float input and __nv_bfloat16 gradients (an fp32
// norm whose output autocast casts; see BackwardKernels in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<float, __nv_bfloat16, true>;
