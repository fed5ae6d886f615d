// The RMSNorm backward kernels for float input (see BackwardKernels in launch.h).
#include "backward_launch.cuh"

template struct normpass::cuda::BackwardKernels<float, float, false>;
