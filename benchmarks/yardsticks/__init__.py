"""Kernels that move a merge's bytes without merging: what a merge kernel is measured by."""
