//! Hot loops with no tape: gemm, conv2d via im2col, and friends. Pure functions over slices,
//! benchmarked on their own.
