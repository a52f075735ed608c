"""Image input handling and preprocessing (no model needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fseg_jax.features import padded_size, preprocess
from fseg_jax.io import as_rgb, collect_images, read_image, to_uint8
from fseg_jax.models.config import ViTConfig


def _rgb(h=20, w=30, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_uint8_rgb_passes_through_untouched():
    img = _rgb()
    out = as_rgb(img)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, img)


def test_gray_and_single_channel_are_replicated():
    gray = _rgb()[..., 0]
    for arr in (gray, gray[..., None]):
        out = as_rgb(arr)
        assert out.shape == (20, 30, 3)
        np.testing.assert_array_equal(out[..., 0], gray)
        np.testing.assert_array_equal(out[..., 2], gray)


def test_rgba_is_composited_over_white_without_mutation():
    rgba = np.concatenate([_rgb(), np.zeros((20, 30, 1), np.uint8)], axis=-1)
    rgba[:10, :, 3] = 255
    before = rgba.copy()
    out = as_rgb(rgba)
    np.testing.assert_array_equal(rgba, before)
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[:10], rgba[:10, :, :3])  # opaque: the colour
    assert (out[10:] == 255).all()  # transparent: white


def test_float_images_in_unit_range():
    img = np.random.default_rng(0).random((8, 9, 3))
    out = as_rgb(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, img, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_rgb(img * 255)


def test_nan_and_inf_are_refused():
    img = np.random.default_rng(0).random((8, 9, 3)).astype(np.float32)
    img[2, 3, 1] = np.nan
    before = img.copy()
    with pytest.raises(ValueError, match="NaN"):
        as_rgb(img)
    np.testing.assert_array_equal(img, before)  # NaN in the same places counts as equal here


def test_unsupported_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        as_rgb(np.zeros((4, 5, 6), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        as_rgb(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(TypeError, match="dtype"):
        as_rgb(np.zeros((4, 5, 3), np.int64))
    with pytest.raises(TypeError, match="dtype"):
        as_rgb(np.zeros((4, 5, 3), bool))
    with pytest.raises(TypeError, match="expected an array"):
        as_rgb(12)


def test_uint16_arrays_scale_to_unit_floats():
    img = np.full((3, 4, 3), 65535, np.uint16)
    img[0, 0] = 0
    out = as_rgb(img)
    assert out.dtype == np.float32 and out.max() == 1.0 and out[0, 0, 0] == 0.0


def test_16bit_png_keeps_precision(tmp_path):
    gray = (np.arange(12 * 16, dtype=np.uint16).reshape(12, 16) * 300).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(gray).save(path)
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == (12, 16, 3)
    np.testing.assert_allclose(out[..., 1], gray / 65535.0, atol=1e-7)


def test_pil_images_of_several_modes():
    rgb = _rgb()
    assert as_rgb(Image.fromarray(rgb)).dtype == np.uint8
    np.testing.assert_array_equal(as_rgb(Image.fromarray(rgb)), rgb)
    assert as_rgb(Image.fromarray(rgb[..., 0], mode="L")).shape == (20, 30, 3)
    assert as_rgb(Image.fromarray(rgb).convert("P")).shape == (20, 30, 3)
    assert as_rgb(Image.fromarray(rgb).convert("CMYK")).shape == (20, 30, 3)
    rgba = Image.fromarray(np.dstack([rgb, np.full((20, 30), 255, np.uint8)]), mode="RGBA")
    np.testing.assert_array_equal(as_rgb(rgba), rgb)


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(bad)


def test_read_image_from_jpeg_bytes(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_rgb()).save(buf, format="JPEG")
    path = tmp_path / "x.jpg"
    path.write_bytes(buf.getvalue())
    out = read_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8


def test_collect_images_kinds():
    img = _rgb()
    assert collect_images(img)[1] == "single"
    batch = np.stack([img, img])
    images, kind = collect_images(batch)
    assert kind == "batch" and len(images) == 2
    images, kind = collect_images([img, _rgb(7, 5)])
    assert kind == "list" and [im.shape for im in images] == [(20, 30, 3), (7, 5, 3)]
    with pytest.raises(ValueError, match="empty"):
        collect_images([])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        collect_images([img, np.zeros((3, 3, 7), np.uint8)])


def test_to_uint8():
    f = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    np.testing.assert_array_equal(to_uint8(f), [[[0, 128, 255]]])


def test_padded_size():
    assert padded_size(975, 1270, 16) == (976, 1280)
    assert padded_size(1, 1, 16) == (16, 16)
    assert padded_size(32, 48, 16) == (32, 48)
    assert padded_size(100, 200, 16, bucket=64) == (128, 256)
    with pytest.raises(ValueError, match="multiple"):
        padded_size(100, 200, 16, bucket=40)


def test_preprocess_normalises_and_edge_pads():
    config = ViTConfig.from_preset("uni")
    img = _rgb(20, 30)
    before = img.copy()
    x = np.asarray(preprocess(img[None], config))
    np.testing.assert_array_equal(img, before)
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32
    expect = (img / 255.0 - np.array(config.mean)) / np.array(config.std)
    np.testing.assert_allclose(x[0, :20, :30], expect, atol=1e-5)
    np.testing.assert_allclose(x[0, 25, 31], expect[19, 29], atol=1e-5)  # bottom-right corner replicated
    np.testing.assert_allclose(x[0, 5, 31], expect[5, 29], atol=1e-5)
    xf = np.asarray(preprocess((img / 255.0).astype(np.float32)[None], config))
    np.testing.assert_allclose(xf, x, atol=1e-5)
    assert np.asarray(preprocess(img[None], config, size=(64, 48))).shape == (1, 64, 48, 3)
    with pytest.raises(ValueError, match="cannot pad"):
        preprocess(img[None], config, size=(16, 48))
    with pytest.raises(TypeError, match="uint8"):
        preprocess(img[None].astype(np.int32), config)
