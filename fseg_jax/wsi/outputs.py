"""Files a slide run writes, each atomically (a temporary name in the same folder, then os.replace).

- `write_label_tiff`: pyramidal tiled OME-TIFF of a label map given by a sampling function (see
  `fseg_jax.wsi.sampling.LabelSampler`), generated band by band while writing, so that it never needs to be
  in memory whole, with the labels' names in its OME-XML (`label_names` reads them back);
- `label_polygons` / `write_geojson`: QuPath annotations, one (multi)polygon per label, in level-0 pixels;
- `write_json`, `write_weights` (safetensors).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fseg_jax._files import atomic_path
from fseg_jax.wsi.sampling import LabelSampler


def remove_stale_temporaries(folder: Path, names: Sequence[str]) -> None:
    """Remove the temporaries that `atomic_path` made for `names` in `folder` and a killed process left there."""
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp*"):
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")  # strict JSON: no NaN or Infinity


def label_dtype(n_labels: int) -> np.dtype:
    return np.dtype(np.uint8) if n_labels <= 256 else np.dtype(np.uint16)


LABEL_NAMES_NAMESPACE = "fseg_jax/labels"


def write_label_tiff(
    path: str | Path,
    sample: LabelSampler,
    *,
    size: tuple[int, int],
    dtype,
    mpp: float,
    names: Sequence[str] | None = None,
    tile: int = 256,
    min_level_side: int = 512,
) -> None:
    """A pyramidal OME-TIFF of `size` = (width, height) pixels at `mpp` microns per pixel.

    `sample(ys, xs)` gives the labels (of `dtype`) at rows ys and columns xs of the full-resolution map;
    the file is written one band of `tile` rows at a time, so memory is a band, never the whole map.
    Reduced levels (halving, the label at each block's top-left pixel) live in SubIFDs, as QuPath, napari
    (tifffile) and Bio-Formats expect of OME-TIFF. `names[v]` names label v: the OME-XML holds them as a
    MapAnnotation (namespace ``fseg_jax/labels``, keys "0", "1", ...), which `label_names` reads.
    """
    import tifffile

    width, height = size
    n_levels = 1
    while max(-(-width // 2**n_levels), -(-height // 2**n_levels)) >= min_level_side and n_levels < 12:
        n_levels += 1

    def tiles(level: int) -> Iterator[np.ndarray]:
        f = 2**level
        lh, lw = -(-height // f), -(-width // f)
        xs = np.arange(lw) * f
        for ty in range(0, lh, tile):
            band = np.zeros((tile, -(-lw // tile) * tile), dtype)
            rows = np.arange(ty, min(ty + tile, lh)) * f
            band[: len(rows), :lw] = sample(rows, xs)
            for tx in range(0, lw, tile):
                yield band[:, tx : tx + tile]

    res = 1e4 / mpp  # pixels per centimetre
    metadata = {
        "axes": "YX",
        "Name": "labels",
        "PhysicalSizeX": mpp,
        "PhysicalSizeY": mpp,
        "PhysicalSizeXUnit": "µm",
        "PhysicalSizeYUnit": "µm",
    }
    if names is not None:
        metadata["MapAnnotation"] = {"Namespace": LABEL_NAMES_NAMESPACE, **{str(v): n for v, n in enumerate(names)}}
    common = dict(dtype=np.dtype(dtype), tile=(tile, tile), compression="zlib", resolutionunit="CENTIMETER")
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tif:
            tif.write(
                tiles(0), shape=(height, width), subifds=n_levels - 1, metadata=metadata,
                resolution=(res, res), **common,
            )
            for level in range(1, n_levels):
                f = 2**level
                tif.write(
                    tiles(level), shape=(-(-height // f), -(-width // f)), subfiletype=1,
                    resolution=(res / f, res / f), **common,
                )


def label_names(path: str | Path) -> dict[int, str]:
    """{label value: name} as `write_label_tiff` records them in an OME-TIFF ({} when it records none)."""
    import xml.etree.ElementTree as ET

    import tifffile

    with tifffile.TiffFile(path) as tif:
        xml = tif.ome_metadata
    if not xml:
        return {}
    for element in ET.fromstring(xml).iter():
        if element.tag.rpartition("}")[2] == "MapAnnotation" and element.get("Namespace") == LABEL_NAMES_NAMESPACE:
            return {int(m.get("K")): m.text or "" for m in element.iter() if m.tag.rpartition("}")[2] == "M"}
    return {}


def label_polygons(labels_hw: np.ndarray, value: int):
    """The region where `labels_hw == value` as a valid shapely MultiPolygon in token coordinates, or None.

    Token (r, c) is the unit square [c, c+1] x [r, r+1] (x right, y down); the polygons follow the token
    edges exactly, so their area is the token count. Rings are traced with marching squares
    (skimage.measure.find_contours, whose vertices are midpoints of token edges) and moved onto the token
    corners between consecutive vertices; holes go to the smallest ring around them. Regions that touch
    only at a corner are separate polygons.
    """
    import shapely
    from skimage.measure import find_contours

    mask = np.pad(labels_hw == value, 1).astype(np.uint8)
    if not mask.any():
        return None
    contours = find_contours(mask, 0.5, fully_connected="high", positive_orientation="high")
    # consecutive marching-squares vertices share a cell whose centre is a token corner, through which
    # the exact boundary runs; in token-corner coordinates (padded index - 1/2) it is floor(midpoint)
    corners = [np.floor((c[:-1] + c[1:]) / 2)[:, ::-1] for c in contours]  # (x, y)
    lengths = np.array([len(c) for c in corners])
    xy = np.concatenate(corners)
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(corners)), lengths))
    # (row, col) -> (x, y) mirrors orientation: rings around labelled tokens come out clockwise in (x, y)
    is_hole = shapely.is_ccw(rings)
    shells = rings[~is_hole]
    holes = rings[is_hole]
    shell_polys = shapely.polygons(shells)
    interiors: list[list] = [[] for _ in shells]
    if len(holes):
        # the midpoint of a hole's first edge lies inside its ancestors' shells and on no shell's boundary
        first = np.array([c[0, ::-1] - 0.5 for c, h in zip(contours, is_hole) if h])
        tree = shapely.STRtree(shell_polys)
        hole_idx, shell_idx = tree.query(shapely.points(first), predicate="within")
        areas = shapely.area(shell_polys)
        parent: dict[int, int] = {}
        for h, s in zip(hole_idx.tolist(), shell_idx.tolist()):
            if h not in parent or areas[s] < areas[parent[h]]:
                parent[h] = s
        for h, s in parent.items():
            interiors[s].append(holes[h])
    polys = np.array([shapely.Polygon(shell, inner) for shell, inner in zip(shells, interiors)], dtype=object)
    polys = shapely.simplify(polys, 0.0)  # tolerance 0 only drops collinear vertices along token edges
    bad = ~shapely.is_valid(polys)
    if bad.any():
        # diagonal neighbours make rings that touch themselves at a corner: split them there
        fixed = shapely.get_parts(shapely.get_parts(shapely.make_valid(polys[bad])))
        polys = np.concatenate([polys[~bad], fixed[shapely.get_type_id(fixed) == 3]])
    geom = shapely.MultiPolygon(list(polys))
    return shapely.orient_polygons(geom)


def write_geojson(
    path: str | Path,
    labels_hw: np.ndarray,
    *,
    names: Sequence[str],
    colors: np.ndarray,
    scale: tuple[float, float],
    bounds: tuple[float, float] | None = None,
    tolerance: float = 0.0,
) -> int:
    """A QuPath FeatureCollection with one annotation per label value >= 1 present in `labels_hw`.

    names[v] and colors[v] (uint8 RGB) describe label v; `scale` = (x, y) level-0 pixels per cell of
    `labels_hw`; `bounds` = (width, height) of level 0, to which polygons are clipped (the last row and
    column of cells may overhang the slide). tolerance: Douglas-Peucker simplification of the cell-edge
    polygons, in cells (0: exact; polygons stay valid either way). Returns the number of features written.
    """
    import shapely

    sx, sy = scale
    features = []
    for value in range(1, len(names)):
        geom = label_polygons(labels_hw, value)
        if geom is None:
            continue
        if tolerance > 0:
            geom = _valid_polygons(shapely.simplify(geom, tolerance, preserve_topology=True))
        geom = shapely.transform(geom, lambda xy: np.round(xy * np.array([sx, sy]), 3))
        if bounds is not None:
            geom = _valid_polygons(shapely.clip_by_rect(geom, 0.0, 0.0, float(bounds[0]), float(bounds[1])))
        if geom.is_empty:
            continue
        features.append(
            {
                "type": "Feature",
                "id": f"label-{value}",
                "geometry": json.loads(shapely.to_geojson(geom)),
                "properties": {
                    "objectType": "annotation",
                    "name": names[value],
                    "classification": {"name": names[value], "color": [int(c) for c in colors[value]]},
                    "label": value,
                },
            }
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return len(features)


def _valid_polygons(geom):
    """`geom` as a valid (Multi)Polygon: repaired (make_valid) when needed, lines and points it degenerates to dropped."""
    import shapely

    if shapely.is_valid(geom) and shapely.get_type_id(geom) in (3, 6):
        return geom
    parts = shapely.get_parts(shapely.get_parts(shapely.make_valid(geom)))
    polys = parts[shapely.get_type_id(parts) == 3]
    return shapely.orient_polygons(shapely.MultiPolygon(list(polys)))


_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.int32): "I32"}


def write_weights(
    path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str], *, chunk_bytes: int = 2**26
) -> None:
    """A safetensors file of `tensors` (float32 or int32 arrays of one or more dimensions, memory maps included)
    with string `metadata`, written about `chunk_bytes` at a time: a memory-mapped tensor is never read whole."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, a in tensors.items():
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]
        }
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for a in tensors.values():
            rows = max(1, chunk_bytes // max(1, a[:1].nbytes))
            for i in range(0, len(a), rows):
                f.write(np.ascontiguousarray(a[i : i + rows], dtype=a.dtype.newbyteorder("<")).tobytes())
