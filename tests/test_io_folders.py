"""fseg_jax.io's folder listing: the one expander behind `fseg-jax segment` inputs and slide folders."""

from __future__ import annotations

import pytest

from fseg_jax.io import IMAGE_SUFFIXES, expand_image_paths, files_in_folder


def _touch(folder, *names):
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def test_files_in_folder_sorted_by_suffix_without_hidden_files(tmp_path):
    folder = _touch(tmp_path / "f", "b.PNG", "a.jpg", ".a.png", "notes.txt", "c.tiff")
    (folder / "sub.png").mkdir()
    assert [p.name for p in files_in_folder(folder)] == ["a.jpg", "b.PNG", "c.tiff"]
    assert [p.name for p in files_in_folder(folder, (".txt",))] == ["notes.txt"]
    assert ".webp" in IMAGE_SUFFIXES


def test_expand_image_paths_keeps_order_and_names_what_is_wrong(tmp_path):
    folder = _touch(tmp_path / "f", "b.png", "a.png")
    single = _touch(tmp_path / "s", "z.jpg") / "z.jpg"
    assert [p.name for p in expand_image_paths([single, folder])] == ["z.jpg", "a.png", "b.png"]
    with pytest.raises(FileNotFoundError, match="missing.png: no such file or folder"):
        expand_image_paths([tmp_path / "missing.png"])
    with pytest.raises(ValueError, match="folder holds no images"):
        expand_image_paths([_touch(tmp_path / "empty", "notes.txt")])


def test_find_slides_lists_a_folder_with_the_slide_suffixes(tmp_path):
    from fseg_jax.wsi.pipeline import find_slides, slide_folder_name

    folder = _touch(tmp_path / "slides", "b.svs", "a.ome.tif", ".hidden.svs", "readme.md")
    assert [p.name for p in find_slides(folder)] == ["a.ome.tif", "b.svs"]
    assert find_slides(folder / "b.svs") == [folder / "b.svs"]
    assert [slide_folder_name(p) for p in find_slides(folder)] == ["a", "b"]
