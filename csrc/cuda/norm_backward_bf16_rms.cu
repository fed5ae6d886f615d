// The RMSNorm backward kernels for __nv_bfloat16 input (see BackwardKernels in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<__nv_bfloat16, __nv_bfloat16, false>;
