// The RMSNorm backward kernels for __half input (see BackwardKernels in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<__half, __half, false>;
