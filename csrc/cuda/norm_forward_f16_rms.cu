// The RMSNorm forward kernels for __half input (see ForwardKernels in launch.h).
#include "forward_launch.cuh"

template struct normpass::cuda::ForwardKernels<__half, false>;
