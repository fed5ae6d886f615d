// The RMSNorm forward kernels for __nv_bfloat16 input (see ForwardKernels in launch.h).
#include "forward_launch.cuh"

template struct normpass::cuda::ForwardKernels<__nv_bfloat16, false>;
