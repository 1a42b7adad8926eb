// Host stand-in for CUDA's math_constants.h (see cuda_mock.h).
#pragma once
#include <math.h>
#define CUDART_INF_F INFINITY
