"""Named concepts: names, colours and classes in a bank, its file, and `fseg-jax concepts name`."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from fseg_jax.cli import main
from fseg_jax.concepts import ConceptBank, ConceptClasses, load_concepts, save_concepts
from fseg_jax.visualize import palette


def _bank(**kwargs) -> ConceptBank:
    rng = np.random.default_rng(0)
    return ConceptBank({8: rng.random((8, 5)), 16: rng.random((16, 5))}, model="uni", layer=-1, **kwargs)


def test_classes_group_concepts_by_name():
    bank = _bank().with_names(16, {3: "tumour", 5: "stroma", 7: "stroma"}, {3: "#D62728", 7: (1, 2, 3)})
    classes = bank.classes(16)
    assert isinstance(classes, ConceptClasses) and classes.k == 16 and len(classes) == 15
    # classes in the order of their first concept; an unnamed concept is a class of its own
    assert classes.names[:7] == ("concept 0", "concept 1", "concept 2", "tumour", "concept 4", "stroma", "concept 6")
    assert classes.concepts[3] == (3,) and classes.concepts[5] == (5, 7) and classes.concepts[6] == (6,)
    assert classes.colors[3] == "#d62728" and classes.colors[5] == "#010203" and classes.colors[0] is None
    assert [classes.is_named(j) for j in (0, 3, 5)] == [False, True, True]
    lut = classes.lut
    assert lut.tolist() == [0, 1, 2, 3, 4, 5, 6, 5, 7, 8, 9, 10, 11, 12, 13, 14]
    # given colours, else the colour the class's first concept is drawn in
    rgb = classes.rgb(palette(16))
    assert rgb.shape == (15, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[3]) == (214, 39, 40) and tuple(rgb[5]) == (1, 2, 3) and tuple(rgb[6]) == tuple(palette(16)[6])


def test_map_is_a_new_array_and_refuses_labels_out_of_range():
    classes = ConceptClasses.from_names(4, {1: "a", 3: "a"})
    labels = np.array([[0, 1], [2, 3]], np.uint8)
    before = labels.copy()
    mapped = classes.map(labels)
    np.testing.assert_array_equal(mapped, [[0, 1], [2, 1]])
    assert mapped.dtype == np.int32 and mapped is not labels
    np.testing.assert_array_equal(labels, before)
    for bad in (np.array([4]), np.array([-1])):
        with pytest.raises(ValueError, match=r"label (4|-1) is out of range for the 4 concepts .* \(0\.\.3\)"):
            classes.map(bad)


def test_with_names_returns_a_new_bank_and_adds_to_or_clears_the_old_names():
    bank = _bank()
    named = bank.with_names(16, {3: "tumour"})
    assert bank.names == {} and not bank.has_names(16) and named.has_names(16) and not named.has_names(8)
    more = named.with_names(16, {5: "  dense   stroma "}, {5: "#00ff00"})
    assert more.names == {16: {3: "tumour", 5: "dense stroma"}} and more.colors == {16: {5: "#00ff00"}}
    assert more.with_names(16, {1: "fat"}, clear=True).names == {16: {1: "fat"}}
    assert more.with_names(16, clear=True).names == {} and more != bank and more.with_names(16, clear=True) == bank
    assert more.names[16] is not named.names[16]  # each bank holds its own copies
    assert "named ks=(16,)" in repr(more)


def test_names_round_trip_and_banks_without_names_load_unchanged(tmp_path):
    bank = _bank().with_names(16, {3: "tumour", 5: "stroma", 7: "stroma"}, {3: "#d62728"})
    bank = bank.with_names(8, {0: "glass"})
    back = load_concepts(save_concepts(tmp_path / "named.safetensors", bank))
    assert back == bank and back.names == bank.names and back.colors == bank.colors
    assert back.classes(16).names == bank.classes(16).names
    plain = load_concepts(save_concepts(tmp_path / "plain.safetensors", _bank()))
    assert plain.names == {} and plain.colors == {} and plain == _bank()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "named.safetensors"), framework="numpy") as f:
        meta = f.metadata()
    assert meta["names.16"] == '{"3": "tumour", "5": "stroma", "7": "stroma"}'
    assert meta["colors.16"] == '{"3": "#d62728"}'
    with safe_open(str(tmp_path / "plain.safetensors"), framework="numpy") as f:
        assert not any(key.startswith(("names", "colors")) for key in f.metadata())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"names": {12: {0: "a"}}}, r"names for k=12, which the bank does not hold \(it holds 8, 16\)"),
        ({"names": {16: {16: "a"}}}, r"names for k=16: concept 16 is out of range \(0\.\.15\)"),
        ({"names": {16: {-1: "a"}}}, r"concept -1 is out of range"),
        ({"names": {16: {2: "  "}}}, "concept 2: expected a non-empty name"),
        ({"colors": {16: {2: "red"}}}, "colour 'red' is not of the form #rrggbb"),
        ({"colors": {16: {2: (0, 0, 256)}}}, "neither #rrggbb nor three integers"),
        ({"names": {16: {1: "a", 2: "a"}}, "colors": {16: {1: "#000000", 2: "#ffffff"}}},
         r"class 'a' is given two colours, #000000 \(concept 1\) and #ffffff \(concept 2\)"),
    ],
)
def test_bad_names_are_one_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _bank(**kwargs)


def test_a_bank_without_names_asked_for_classes():
    with pytest.raises(ValueError, match=r"no names for k=16: name its concepts first"):
        _bank().classes(16)
    with pytest.raises(ValueError, match=r"k=12 is not in this concept bank"):
        _bank().classes(12)


def test_corrupt_names_in_a_file_are_a_clear_error(tmp_path):
    from safetensors.numpy import save_file

    path = save_concepts(tmp_path / "b.safetensors", _bank())
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "names.16": '{"20": "x"}'})
    with pytest.raises(ValueError, match=r"bad.safetensors: .*concept 20 is out of range \(0\.\.15\)"):
        load_concepts(tmp_path / "bad.safetensors")


# --- fseg-jax concepts name ---------------------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, ["concepts", "name", *map(str, args)])


def test_cli_names_a_bank_in_place_and_prints_its_classes(tmp_path):
    path = save_concepts(tmp_path / "b.safetensors", _bank())
    result = _run(path, "--k", 16, "3=tumour", "5=stroma", "7=stroma", "--color", "3=#d62728")
    assert result.exit_code == 0, result.output
    bank = load_concepts(path)
    assert bank.names == {16: {3: "tumour", 5: "stroma", 7: "stroma"}} and bank.colors == {16: {3: "#d62728"}}
    lines = result.output.splitlines()
    assert lines[0] == f"wrote {path}" and lines[1] == "k=16: 15 classes"
    assert lines[2].split() == ["tumour", "#d62728", "concepts", "3"]
    assert lines[3].split() == ["stroma", "-", "concepts", "5,", "7"]
    assert lines[4] == "  without a name: concepts 0, 1, 2, 4, 6, 8, 9, 10, 11, 12, 13, 14, 15"
    # more names add to these; no assignment only prints; --clear -o writes a bank without them elsewhere
    assert _run(path, "--k", 16, "0=glass").exit_code == 0
    assert load_concepts(path).names[16] == {0: "glass", 3: "tumour", 5: "stroma", 7: "stroma"}
    shown = _run(path, "--k", 16)
    assert shown.exit_code == 0 and not shown.output.startswith("wrote") and "glass" in shown.output
    cleared = _run(path, "--k", 16, "--clear", "-o", tmp_path / "c.safetensors")
    assert cleared.exit_code == 0 and cleared.output.splitlines()[1] == "k=16: no names"
    assert load_concepts(tmp_path / "c.safetensors") == _bank() and load_concepts(path).has_names(16)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["3=tumour"], 2, "--k is required: the bank holds k in 8, 16"),
        (["--k", "12", "3=tumour"], 1, "k=12 is not in"),
        (["--k", "16", "16=tumour"], 1, r"concept 16 is out of range \(0\.\.15\)"),
        (["--k", "16", "3tumour"], 2, ("Invalid value for 'INDEX=NAME...': expected INDEX=NAME with INDEX a "
                                       "concept number, got '3tumour'")),
        (["--k", "16", "x=tumour"], 2, "'INDEX=NAME...': expected INDEX=NAME .*, got 'x=tumour'"),
        (["--k", "16", "\u00b2=tumour"], 2, "'INDEX=NAME...': expected INDEX=NAME .*, got '\u00b2=tumour'"),
        (["--k", "16", "\u0663=tumour"], 2, "'INDEX=NAME...': expected INDEX=NAME .*, got '\u0663=tumour'"),
        (["--k", "16", "3.0=tumour"], 2, "'INDEX=NAME...': expected INDEX=NAME .*, got '3.0=tumour'"),
        (["--k", "16", "3=concept 5"], 1, "concept 3 cannot be named 'concept 5': that name is reserved for concept 5"),
        (["--k", "16", "3="], 1, "concept 3: expected a non-empty name"),
        (["--k", "16", "--color", "3=#d6272"], 1, "colour '#d6272' is not of the form #rrggbb"),
        (["--k", "16", "--color", "3"], 2, "Invalid value for '--color': expected INDEX=#RRGGBB .*, got '3'"),
        (["--k", "16", "--color", "\u00b9=#000000"], 2, "'--color': expected INDEX=#RRGGBB .*, got '\u00b9=#000000'"),
        (["--k", "16", "5=s", "7=s", "--color", "5=#000000", "--color", "7=#ffffff"], 1, "given two colours"),
    ],
)
def test_cli_bad_input_is_one_line_and_leaves_the_bank_as_it_was(tmp_path, args, code, message):
    import re

    path = save_concepts(tmp_path / "b.safetensors", _bank().with_names(16, {1: "fat"}))
    before = path.read_bytes()
    result = _run(path, *args)
    assert result.exit_code == code and re.search(message, result.output), result.output
    assert result.output.splitlines()[-1].startswith("Error: ") and result.output.count("Error") == 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors"]  # no temporary left behind


def test_cli_refuses_what_is_not_a_bank(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"not a bank")
    result = _run(tmp_path / "x.safetensors", "--k", 16, "3=tumour")
    assert result.exit_code == 1 and "not a readable safetensors concept bank" in result.output
    assert (tmp_path / "x.safetensors").read_bytes() == b"not a bank"


def test_a_header_whose_length_starts_with_the_pickle_byte_is_still_a_bank(tmp_path):
    """safetensors begins with the header's length; names make it vary, and a low byte of 0x80 is no pickle."""
    for n in range(1, 300):
        path = save_concepts(tmp_path / "b.safetensors", _bank().with_names(16, {0: "x" * n}))
        if path.read_bytes()[:1] == b"\x80":
            break
    else:
        pytest.fail("no name length gave a header length with low byte 0x80")
    assert load_concepts(path).names[16][0] == "x" * n


def test_classes_from_names_check_their_input():
    with pytest.raises(ValueError, match=r"concept 4 is out of range for k=4 \(0\.\.3\)"):
        ConceptClasses.from_names(4, {4: "a"})
    with pytest.raises(ValueError, match=r"concept -1 is out of range"):
        ConceptClasses.from_names(4, {}, {-1: "#000000"})
    with pytest.raises(ValueError, match="non-empty strings"):
        ConceptClasses.from_names(4, {1: ""})


def test_a_name_that_is_another_concepts_unnamed_name_is_refused():
    """"concept 3" as concept 1's name would silently merge concept 1 with the unnamed concept 3."""
    message = "concept 1 cannot be named 'concept 3': that name is reserved for concept 3"
    with pytest.raises(ValueError, match=message):
        ConceptClasses.from_names(4, {1: "concept 3"})
    with pytest.raises(ValueError, match=message):
        _bank().with_names(8, {1: "concept 3"})
    with pytest.raises(ValueError, match=message):
        ConceptBank({8: np.ones((8, 5))}, names={8: {1: "  concept   3 "}})
    # a concept's own unnamed name, and the name of a concept the bank's k lacks, are names like any other
    assert ConceptClasses.from_names(4, {1: "concept 1"}).names == ("concept 0", "concept 1", "concept 2", "concept 3")
    assert ConceptClasses.from_names(4, {1: "concept 4", 2: "concept 4"}).concepts == ((0,), (1, 2), (3,))


def test_cli_names_the_published_uni_bank_and_changes_nothing_else(shared_data, tmp_path):
    from fseg_jax.concepts import import_joblib_concepts

    original = import_joblib_concepts(shared_data / "concepts" / "uni.joblib", trust_pickle=True, model="uni")
    path = save_concepts(tmp_path / "uni.safetensors", original)
    result = _run(path, "--k", 16, "3=tumour", "5=stroma", "7=stroma", "--color", "3=#d62728")
    assert result.exit_code == 0, result.output
    named = load_concepts(path)
    assert named.names == {16: {3: "tumour", 5: "stroma", 7: "stroma"}} and named.ks == original.ks
    assert (named.model, named.layer) == (original.model, original.layer)
    assert all(np.array_equal(named[k], original[k]) for k in original.ks)
    assert named.with_names(16, clear=True) == original
