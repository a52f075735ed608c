"""The names of F-Seg's segmentation methods (what each does: ``fseg_jax.segmentation``).

A module of its own, free of JAX, so that the command line can offer them as choices without importing the
pipeline: ``fseg-jax --help`` stays fast.
"""

METHODS = ("project", "nearest", "factorize", "dff")
