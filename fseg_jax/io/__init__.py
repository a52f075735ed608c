"""Reading and normalising input images: files, PIL images and arrays in, RGB arrays out."""

from fseg_jax.io.folders import IMAGE_SUFFIXES, expand_image_paths, files_in_folder, iter_images
from fseg_jax.io.images import as_rgb, collect_images, over_white, read_image, to_uint8

__all__ = [
    "IMAGE_SUFFIXES",
    "as_rgb",
    "collect_images",
    "expand_image_paths",
    "files_in_folder",
    "iter_images",
    "over_white",
    "read_image",
    "to_uint8",
]
