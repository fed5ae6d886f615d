// The LayerNorm backward kernels for __nv_bfloat16 input and fp32 gradients (see BackwardKernels
// in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<__nv_bfloat16, float, true>;
