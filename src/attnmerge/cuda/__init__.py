"""CUDA C++ backend: NVRTC compilation, build cache and kernel launches."""
