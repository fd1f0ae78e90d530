"""Benchmarks, yardsticks and experiments around attnmerge; not part of the package."""
