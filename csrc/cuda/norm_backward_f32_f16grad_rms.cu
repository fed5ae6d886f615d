// The RMSNorm backward kernels for float input and __half gradients (an fp32
// norm whose output autocast casts; see BackwardKernels in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<float, __half, false>;
