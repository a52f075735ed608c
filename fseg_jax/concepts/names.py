"""Names, colours and classes of a bank's concepts.

A bank may name some of its concepts, per k (``3 -> "tumour"``, ``5 -> "stroma"``, ``7 -> "stroma"``) and give
some a colour (``3 -> "#d62728"``). A concept's class is its name: concepts that share a name form one class,
and a concept without a name is a class of its own, called ``"concept 7"``. :class:`ConceptClasses` is that
grouping for one k; ``ConceptBank.classes(k)`` builds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


def default_name(concept: int) -> str:
    """The name of a concept that has none: ``"concept 7"``."""
    return f"concept {int(concept)}"


def parse_color(value: Any) -> str:
    """A colour as ``"#rrggbb"`` (lower case), from ``"#rrggbb"`` or an (r, g, b) sequence of ints 0..255.
    ValueError otherwise."""
    if isinstance(value, str):
        if _HEX_COLOR.fullmatch(value.strip()):
            return value.strip().lower()
        raise ValueError(f"colour {value!r} is not of the form #rrggbb")
    if (
        isinstance(value, (tuple, list, np.ndarray))
        and len(value) == 3
        and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        return "#" + "".join(f"{int(c):02x}" for c in value)
    raise ValueError(f"colour {value!r} is neither #rrggbb nor three integers 0..255")


def color_rgb(color: str) -> tuple[int, int, int]:
    """``"#rrggbb"`` as an (r, g, b) tuple of ints."""
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def validated_names(
    names: Any, colors: Any, ks: tuple[int, ...]
) -> tuple[dict[int, dict[int, str]], dict[int, dict[int, str]]]:
    """``({k: {concept: name}}, {k: {concept: "#rrggbb"}})`` checked against the bank's ks, as new sorted dicts.

    One ValueError lists every problem: a k the bank lacks, a concept out of 0..k-1, an empty name, a colour
    that is not #rrggbb, two colours for one class. Empty per-k entries are dropped.
    """
    problems: list[str] = []
    out_names: dict[int, dict[int, str]] = {}
    out_colors: dict[int, dict[int, str]] = {}
    for what, given, out in (("names", names, out_names), ("colours", colors, out_colors)):
        if given is None:
            continue
        if not isinstance(given, Mapping):
            problems.append(f"{what}: expected a dict {{k: {{concept: value}}}}, got {type(given).__name__}")
            continue
        for k, entries in given.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) not in ks:
                problems.append(f"{what} for k={k!r}, which the bank does not hold (it holds "
                                f"{', '.join(map(str, ks))})")
                continue
            k = int(k)
            if not isinstance(entries, Mapping):
                problems.append(f"{what} for k={k}: expected a dict {{concept: value}}, got {type(entries).__name__}")
                continue
            checked = {}
            for concept, value in entries.items():
                if isinstance(concept, bool) or not isinstance(concept, (int, np.integer)) or not 0 <= concept < k:
                    problems.append(f"{what} for k={k}: concept {concept!r} is out of range (0..{k - 1})")
                elif what == "names":
                    if not isinstance(value, str) or not value.strip():
                        problems.append(f"names for k={k}: concept {int(concept)}: expected a non-empty name, "
                                        f"got {value!r}")
                    else:
                        checked[int(concept)] = " ".join(value.split())
                else:
                    try:
                        checked[int(concept)] = parse_color(value)
                    except ValueError as e:
                        problems.append(f"colours for k={k}: concept {int(concept)}: {e}")
            if checked:
                out[k] = checked
    if not problems:
        for k in sorted(set(out_names) | set(out_colors)):
            try:
                ConceptClasses.from_names(k, out_names.get(k, {}), out_colors.get(k, {}))
            except ValueError as e:
                problems.append(f"k={k}: {e}")
    if problems:
        raise ValueError("invalid concept names: " + "; ".join(problems))
    return _sorted(out_names), _sorted(out_colors)


def _sorted(per_k: dict[int, dict[int, str]]) -> dict[int, dict[int, str]]:
    return {k: dict(sorted(v.items())) for k, v in sorted(per_k.items())}


def check_classes(classes: Any, k: int) -> None:
    """ValueError unless `classes` is None or the :class:`ConceptClasses` of k concepts."""
    if classes is not None and (not isinstance(classes, ConceptClasses) or classes.k != k):
        raise ValueError(f"classes must be the ConceptClasses of the k={k} concepts, got {classes!r}")


@dataclass(frozen=True, eq=False)
class ConceptClasses:
    """The classes of one k of a bank: which concepts each class merges, its name and its colour.

    Attributes:
        k: the number of concepts.
        names: the class names, in the order of each class's first concept.
        concepts: for each class, its concept indices (ascending); together they cover 0..k-1 once.
        colors: for each class, its given colour ``"#rrggbb"`` or None (then it is drawn in the colour of its
            first concept, see :meth:`rgb`).

    ``classes.lut`` is the (k,) int32 class index of each concept; :meth:`map` turns a concept label map into
    a class label map. Build one with :meth:`from_names` or ``ConceptBank.classes(k)``.
    """

    k: int
    names: tuple[str, ...]
    concepts: tuple[tuple[int, ...], ...]
    colors: tuple[str | None, ...]

    def __post_init__(self):
        members = sorted(c for group in self.concepts for c in group)
        if members != list(range(self.k)):
            raise ValueError(f"the classes' concepts must cover 0..{self.k - 1} once each, got {self.concepts}")
        if not len(self.names) == len(self.concepts) == len(self.colors) or len(set(self.names)) != len(self.names):
            raise ValueError("one distinct name and one colour (or None) per class are needed")

    @classmethod
    def from_names(cls, k: int, names: Mapping[int, str], colors: Mapping[int, str] | None = None) -> ConceptClasses:
        """Group concepts 0..k-1 by name (``names``: {concept: name}; unnamed concepts: ``"concept i"``), each
        class coloured by the colour given to any of its concepts (``colors``: {concept: "#rrggbb"}).
        ValueError for a concept outside 0..k-1, an empty name, another concept's unnamed name (``"concept 5"``
        given to concept 3, which would merge it with concept 5), or a class given two different colours."""
        for concept in [*names, *(colors or {})]:
            if isinstance(concept, bool) or not isinstance(concept, (int, np.integer)) or not 0 <= concept < k:
                raise ValueError(f"concept {concept!r} is out of range for k={k} (0..{k - 1})")
        if any(not isinstance(name, str) or not name.strip() for name in names.values()):
            raise ValueError(f"names must be non-empty strings, got {dict(names)!r}")
        reserved = {default_name(concept): concept for concept in range(int(k))}
        for concept, name in names.items():
            if reserved.get(name, concept) != concept:
                raise ValueError(f"concept {int(concept)} cannot be named {name!r}: that name is reserved for concept "
                                 f"{reserved[name]}")
        groups: dict[str, list[int]] = {}
        for concept in range(int(k)):
            groups.setdefault(names.get(concept, default_name(concept)), []).append(concept)
        given = {int(c): parse_color(v) for c, v in (colors or {}).items()}
        class_colors = []
        for name, members in groups.items():
            found = {given[c]: c for c in members if c in given}
            if len(found) > 1:
                shown = " and ".join(f"{color} (concept {c})" for color, c in found.items())
                raise ValueError(f"class {name!r} is given two colours, {shown}")
            class_colors.append(next(iter(found), None))
        return cls(int(k), tuple(groups), tuple(tuple(m) for m in groups.values()), tuple(class_colors))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lut(self) -> np.ndarray:
        """(k,) int32: the class index of each concept (a new array)."""
        out = np.zeros(self.k, np.int32)
        for j, members in enumerate(self.concepts):
            out[list(members)] = j
        return out

    def is_named(self, j: int) -> bool:
        """Whether class j was named (False for an unnamed concept, a class of its own)."""
        members = self.concepts[j]
        return not (len(members) == 1 and self.names[j] == default_name(members[0]))

    def map(self, labels: Any) -> np.ndarray:
        """Class labels (a new int32 array of the same shape) of concept labels in 0..k-1.
        ValueError when a label is out of that range."""
        lab = np.asarray(labels)
        if lab.dtype.kind not in "iu":
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
        if lab.size and (int(lab.min()) < 0 or int(lab.max()) >= self.k):
            bad = int(lab.min()) if int(lab.min()) < 0 else int(lab.max())
            raise ValueError(f"label {bad} is out of range for the {self.k} concepts of these classes "
                             f"(0..{self.k - 1})")
        return self.lut[lab]

    def rgb(self, concept_rgb: Any) -> np.ndarray:
        """(classes, 3) uint8 colours: each class's given colour, else ``concept_rgb[first concept]``, where
        ``concept_rgb`` is the (k, 3) uint8 colours the concepts are drawn in without names (a palette)."""
        concept_rgb = np.asarray(concept_rgb)
        if concept_rgb.shape != (self.k, 3):
            raise ValueError(f"expected ({self.k}, 3) concept colours, got shape {concept_rgb.shape}")
        return np.asarray(
            [color_rgb(c) if c is not None else concept_rgb[m[0]] for c, m in zip(self.colors, self.concepts)],
            np.uint8,
        ).reshape(len(self), 3)

    def __repr__(self) -> str:
        return f"ConceptClasses(k={self.k}, names={self.names})"
