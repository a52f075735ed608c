"""Reading and normalising input images: files, PIL images and arrays in, RGB arrays out."""

from fseg_jax.io.images import as_rgb, collect_images, read_image, to_uint8

__all__ = ["as_rgb", "collect_images", "read_image", "to_uint8"]
