"""fseg_jax.segment with a small random model: methods, batching, bucketing, upsampling, bad inputs."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_config, tiny_vit

import fseg_jax.segmentation as seg
from fseg_jax.concepts import ConceptBank
from fseg_jax.segmentation import make_token_fn, segment
from fseg_jax.upsample import upsample, upsample_argmax

D = 32


@pytest.fixture(scope="module")
def model():
    return tiny_vit(tiny_config(patch_size=16, embed_dim=D, depth=2, num_heads=2, reg_tokens=0))


@pytest.fixture(scope="module")
def concepts():
    return np.abs(np.random.default_rng(1).standard_normal((6, D))).astype(np.float32)


def _image(h, w, seed=0):
    """A smooth random picture (blobs of colour), so tokens differ from each other."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 12 + 1), max(1, w // 12 + 1), 3), dtype=np.uint8)
    return np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(small).permute(2, 0, 1)[None].float(), size=(h, w), mode="bilinear")[0]
        .permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())


# --- upsampling ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,k,s", [(3, 5, 4, 16), (7, 4, 5, 14), (1, 1, 3, 16), (2, 9, 3, 2)])
def test_upsample_matches_jax_resize_and_torch(h, w, k, s):
    x = np.random.default_rng(0).random((h, w, k), dtype=np.float32)
    up = np.asarray(upsample(jnp.asarray(x), (h * s, w * s)))
    ref = np.asarray(jax.image.resize(x, (h * s, w * s, k), method="linear"))
    tt = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(2, 0, 1))[None], (h * s, w * s),
                                         mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(up, ref, atol=1e-6)
    np.testing.assert_allclose(up, tt, atol=1e-6)
    labels = np.asarray(upsample_argmax(jnp.asarray(x), (h * s, w * s)))
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, ref.argmax(-1))


def test_upsample_argmax_ties_go_to_lowest_index():
    x = jnp.ones((2, 3, 4), jnp.float32)
    assert int(np.asarray(upsample_argmax(x, (32, 48))).max()) == 0


def test_upsample_argmax_memory_is_a_few_planes_whatever_k():
    """4096 x 4096 labels from 256 concepts: the full (H, W, k) float32 array would be 16 GiB."""
    h = w = 4096
    k = 256
    compiled = jax.jit(lambda x: upsample_argmax(x, (h, w))).lower(
        jax.ShapeDtypeStruct((h // 16, w // 16, k), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp <= 8 * h * w * 4, f"{temp / 2**20:.0f} MiB of temporaries"


def test_upsample_needs_integer_factors():
    with pytest.raises(ValueError, match="integer"):
        upsample(jnp.ones((3, 5, 2)), (40, 80))


# --- methods -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["project", "nearest", "factorize", "dff"])
def test_methods_shapes_and_weights(model, concepts, method):
    img = _image(40, 56)
    before = img.copy()
    res = segment(img, concepts, model=model, method=method, k=6 if method == "dff" else None,
                  n_components=5, return_weights=True)
    np.testing.assert_array_equal(img, before)
    assert res.labels.shape == (40, 56) and res.labels.dtype == np.int32
    assert res.labels.min() >= 0 and res.labels.max() < 6
    m = 5 if method == "factorize" else 6
    assert res.weights.shape == (3, 4, m)
    if method == "project":
        assert (res.weights >= 0).all()
    if method == "nearest":
        assert (np.abs(res.weights) <= 1 + 1e-5).all()
    if method in ("factorize", "dff"):
        assert res.components.shape == (m, D) and (res.components >= 0).all()
    if method == "factorize":
        assert res.component_concepts.shape == (5,)
        assert set(np.unique(res.labels)) <= set(res.component_concepts.tolist())
    else:
        assert res.component_concepts is None


@pytest.mark.parametrize("method", ["project", "nearest"])
def test_labels_are_argmax_of_upsampled_weights(model, concepts, method):
    img = _image(48, 64, seed=3)
    res = segment(img, concepts, model=model, method=method, return_weights=True)
    ref = np.asarray(jax.image.resize(res.weights, (48, 64, 6), method="linear")).argmax(-1)
    np.testing.assert_array_equal(res.labels, ref)


def test_batch_equals_single_images(model, concepts):
    imgs = np.stack([_image(40, 56, seed=s) for s in range(3)])
    batch = segment(imgs, concepts, model=model, batch=4)
    assert batch.shape == (3, 40, 56)
    for i in range(3):
        np.testing.assert_array_equal(batch[i], segment(imgs[i], concepts, model=model))


def test_list_of_varied_sizes(model, concepts):
    imgs = [_image(40, 56, 0), _image(17, 33, 1), _image(40, 50, 2)]
    out = segment(imgs, concepts, model=model, method="nearest")
    assert isinstance(out, list) and [o.shape for o in out] == [(40, 56), (17, 33), (40, 50)]
    for im, o in zip(imgs, out):
        np.testing.assert_array_equal(o, segment(im, concepts, model=model, method="nearest"))


def test_factorize_batch_equals_single(model, concepts):
    imgs = [_image(32, 48, 5), _image(32, 48, 6)]
    out = segment(imgs, concepts, model=model, method="factorize", n_components=4)
    for im, o in zip(imgs, out):
        np.testing.assert_array_equal(o, segment(im, concepts, model=model, method="factorize", n_components=4))


def test_bucketing_compiles_a_handful_of_times(model, concepts, monkeypatch):
    """Traces of the program, counted on the model's features inside it (sizes no other test here uses, so
    every program below is compiled by this test)."""
    def count_traces(n):
        chex.clear_trace_counter()
        monkeypatch.setattr(seg, "token_features", chex.assert_max_traces(original, n=n))

    original = seg.token_features
    sizes = [(33, 72), (47, 90), (20, 100), (120, 30), (50, 128), (61, 17), (18, 18), (40, 127)]
    imgs = [_image(h, w, i) for i, (h, w) in enumerate(sizes)]
    count_traces(1)
    out = segment(imgs, concepts, model=model, bucket=128, batch=8)
    assert [o.shape for o in out] == sizes  # every image pads to 128 x 128: one program
    segment(imgs, concepts, model=model, bucket=128, batch=8)  # compiled once, reused
    count_traces(3)
    # without a bucket: one program per distinct padded size (48 x 80, 48 x 96, 32 x 112)
    for o, (h, w) in zip(segment(imgs[:3], concepts, model=model, batch=8), sizes):
        chex.assert_shape(o, (h, w))
    with pytest.raises(AssertionError, match="traced > 3 times"):  # the fourth size is a fourth program
        segment(imgs[3], concepts, model=model)


def test_layer_list_concatenates_blocks(model):
    c = np.abs(np.random.default_rng(2).standard_normal((4, 2 * D))).astype(np.float32)
    res = segment(_image(32, 32), c, model=model, layer=[0, -1], return_weights=True)
    assert res.weights.shape == (2, 2, 4)
    with pytest.raises(ValueError, match="feature dimension"):
        segment(_image(32, 32), c, model=model, layer=-1)
    with pytest.raises(ValueError, match="out of range"):
        segment(_image(32, 32), c, model=model, layer=5)


def test_concept_bank_selection(model, concepts):
    bank = ConceptBank({6: concepts, 3: concepts[:3]}, model="tiny", layer=-1)
    img = _image(32, 32)
    np.testing.assert_array_equal(segment(img, bank, model=model, k=6), segment(img, concepts, model=model))
    with pytest.raises(ValueError, match="available: 3, 6"):
        segment(img, bank, model=model, k=16)
    with pytest.raises(ValueError, match="pass k="):
        segment(img, bank, model=model)


def test_make_token_fn_matches_segment(model, concepts):
    imgs = np.stack([_image(32, 48, s) for s in range(2)])
    fn, params = make_token_fn(model, concepts, method="project")
    w = np.asarray(jax.jit(fn)(params, jnp.asarray(imgs)))
    assert w.shape == (2, 2, 3, 6) and w.dtype == np.float32
    res = segment(imgs, concepts, model=model, return_weights=True)
    np.testing.assert_allclose(w, res.weights, rtol=1e-4, atol=1e-5)

    fn, params = make_token_fn(model, concepts, method="factorize", n_components=4)
    scores = np.asarray(jax.jit(fn)(params, jnp.asarray(imgs)))
    res = segment(imgs, concepts, model=model, method="factorize", n_components=4, return_weights=True)
    assert scores.shape == (2, 2, 3, 6)
    for i in range(2):
        token_labels = res.component_concepts[i][res.weights[i].argmax(-1)]
        np.testing.assert_array_equal(scores[i].argmax(-1), token_labels)


def test_make_token_fn_takes_a_bank_and_k(model, concepts):
    bank = ConceptBank({6: concepts, 3: concepts[:3]}, model="tiny", layer=-1)
    _, params = make_token_fn(model, bank, k=3, method="nearest")
    np.testing.assert_array_equal(np.asarray(params["concepts"]), concepts[:3])
    with pytest.raises(ValueError, match="pass k="):
        make_token_fn(model, bank)
    _, params = make_token_fn(model, None, k=5, method="dff")
    assert params["concepts"].shape == (5, D)
    with pytest.raises(ValueError, match="dff' needs k"):
        make_token_fn(model, None, method="dff")


def test_make_token_fn_bfloat16_computes_the_model_in_bfloat16(model, concepts):
    imgs = jnp.asarray(np.stack([_image(32, 48, s) for s in range(2)]))

    def bf16_matmuls(fn, params):
        hlo = jax.jit(fn).lower(params, imgs).as_text()
        return sum("xbf16>, tensor<" in line for line in hlo.splitlines() if "dot_general" in line)

    fn, params = make_token_fn(model, concepts, method="nearest", dtype=jnp.bfloat16)
    fn32, params32 = make_token_fn(model, concepts, method="nearest")
    # patch embedding, then per block qkv, two attention products, proj, fc1, fc2
    assert bf16_matmuls(fn, params) >= 1 + 6 * model.config.depth
    assert bf16_matmuls(fn32, params32) == 0
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params["model"])
               if jnp.issubdtype(leaf.dtype, jnp.floating))
    w = np.asarray(jax.jit(fn)(params, imgs))
    np.testing.assert_allclose(w, np.asarray(jax.jit(fn32)(params32, imgs)), atol=0.05)



def test_segment_in_bfloat16_stays_close_to_float32(model, concepts):
    img = _image(48, 64, 3)
    ref = segment(img, concepts, model=model, method="nearest", return_weights=True)
    bf16 = segment(img, concepts, model=model, method="nearest", dtype=jnp.bfloat16, return_weights=True)
    assert bf16.weights.dtype == np.float32 and bf16.labels.dtype == np.int32
    assert not np.array_equal(bf16.weights, ref.weights)  # the forward really ran in bfloat16
    error = np.abs(bf16.weights - ref.weights).max()
    assert error <= 0.05
    # upsampling mixes weights convexly, so no upsampled weight moves by more than `error`: the labels must agree
    # wherever float32's best concept leads the runner-up by more than twice that
    up = np.sort(np.asarray(jax.image.resize(ref.weights, (48, 64, 6), method="linear")), axis=-1)
    clear = up[..., -1] - up[..., -2] > 2 * error
    assert clear.mean() > 0.5, "too few clear pixels to be a test"
    np.testing.assert_array_equal(bf16.labels[clear], ref.labels[clear])

# --- bad inputs --------------------------------------------------------------------------------------------------


def test_tiny_images_are_padded_to_one_patch(model, concepts):
    one = segment(np.full((1, 1, 3), 200, np.uint8), concepts, model=model)
    assert one.shape == (1, 1)
    small = segment(_image(10, 7), concepts, model=model, method="nearest")
    assert small.shape == (10, 7) and len(np.unique(small)) == 1  # one token


def test_bad_inputs_have_clear_errors(model, concepts):
    img = _image(32, 32)
    with pytest.raises(ValueError, match="unknown method 'kmeans'"):
        segment(img, concepts, model=model, method="kmeans")
    with pytest.raises(ValueError, match=r"concept dimension 31 .* feature dimension 32"):
        segment(img, concepts[:, :31], model=model)
    with pytest.raises(ValueError, match="k=5 but the concepts array holds 6"):
        segment(img, concepts, model=model, k=5)
    nan_img = img.astype(np.float32) / 255
    nan_img[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment(nan_img, concepts, model=model)
    bad = concepts.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        segment(img, bad, model=model)
    with pytest.raises(ValueError, match="needs concepts"):
        segment(img, None, model=model)
    with pytest.raises(ValueError, match="dff' needs k"):
        segment(img, None, model=model, method="dff")


def test_inputs_are_never_mutated(model, concepts):
    c = concepts.copy()
    c[0, :5] = -0.5  # negative concepts are clipped in a copy
    c_before = c.copy()
    imgs = [_image(32, 32, 0), _image(20, 30, 1)]
    before = [im.copy() for im in imgs]
    segment(imgs, c, model=model)
    np.testing.assert_array_equal(c, c_before)
    for im, b in zip(imgs, before):
        np.testing.assert_array_equal(im, b)


def test_float_rgba_gray_pil_and_path_inputs_match_uint8(model, concepts, tmp_path):
    img = _image(32, 48)
    ref = segment(img, concepts, model=model)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(segment(rgba, concepts, model=model), ref)
    np.testing.assert_array_equal(segment(Image.fromarray(img), concepts, model=model), ref)
    Image.fromarray(img).save(tmp_path / "img.png")
    np.testing.assert_array_equal(segment(str(tmp_path / "img.png"), concepts, model=model), ref)
    gray = img[..., 1]
    np.testing.assert_array_equal(segment(gray, concepts, model=model),
                                  segment(np.repeat(gray[..., None], 3, axis=2), concepts, model=model))
    # uint8 v is read as the correctly rounded v / 255, the float32 value numpy computes: the same features
    np.testing.assert_array_equal(segment(img.astype(np.float32) / 255.0, concepts, model=model), ref)
    # a 16-bit grayscale PNG keeps its precision: the same picture as the 8-bit gray one, scaled by 257, is read
    # as v * 257 / 65535, which rounds to the same float32 as v / 255
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    gray16 = segment(tmp_path / "gray16.png", concepts, model=model)
    gray_float = segment(np.repeat(gray[..., None], 3, axis=2).astype(np.float32) / 255.0, concepts, model=model)
    np.testing.assert_array_equal(gray16, gray_float)


def test_one_runner_places_the_parameters_once_and_gives_weights_without_labels(model, concepts, monkeypatch):
    """Pipeline.weights is segment's weights without the labels; both run through the parameters placed on the
    devices by the first call, never again, and the padding policy copies the last image."""
    pipeline = seg.Pipeline.create(concepts, model=model, batch=4)
    images = [_image(40, 56, 1), _image(40, 56, 2), _image(33, 20, 3)]
    full = pipeline.segment(images, return_weights=True)
    from flax import nnx

    split, placements = nnx.split, []
    monkeypatch.setattr(nnx, "split", lambda *a: placements.append(a) or split(*a))
    weights = pipeline.weights(images)
    pipeline.segment(images[:1])
    assert placements == []  # nothing split or placed again
    assert len(weights) == 3 and weights[2].shape == (3, 2, 6)
    for ours, theirs in zip(weights, full.weights):
        np.testing.assert_array_equal(ours, theirs)
    batch = np.stack([_image(8, 8, 1), _image(8, 8, 2), _image(8, 8, 3)])
    padded = seg.pad_batch(batch, 16)
    assert padded.shape[0] == 4 and padded is not batch and (padded[3] == batch[2]).all()
    np.testing.assert_array_equal(padded[:3], batch)
    two = batch[:2]
    assert seg.pad_batch(two, 16) is two  # a power of two already: nothing added, nothing copied
