// The LayerNorm backward kernels for __half input and fp32 gradients (see BackwardKernels
// in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<__half, float, true>;
