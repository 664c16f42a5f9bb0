"""Compiling (NVRTC), caching, loading and launching generated kernels; PyTorch layers."""
