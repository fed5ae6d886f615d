// The RMSNorm forward kernels for float input (see ForwardKernels in launch.h).
#include "forward_launch.cuh"

template struct normpass::cuda::ForwardKernels<float, false>;
