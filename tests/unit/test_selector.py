"""The selector language: parse, errors with a caret, evaluation, canonical text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from herder import selector
from herder.model import TaskSpec, labels_match
from herder.selector import Facts, SelectorError, canonical, matches, parse, parse_key

FACTS = Facts(
    node="n1",
    labels={"gpu": "1", "zone": "eu-1", "tier": "gold"},
    data={"disk": "ssd", "rack": {"row": 3}, "fast": True},
    resources={"cpus": 8, "mem_gb": 16.0, "gpus": 1},
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('gpu == 1 and mem_gb >= 8 and zone in ["eu-1","eu-2"]', True),
        ('zone not in ["eu-1"]', False),
        ("gpu == 2 or cpus > 4", True),
        ("not (gpu == 1)", False),
        ('data.disk == "ssd"', True),
        ("disk == 'ssd'", True),
        ("rack.row >= 3 and data.rack.row < 4", True),
        ("fast == true", True),
        ("fast", True),
        ('node == "n1"', True),
        ("labels.gpu == 1", True),
        ("resources.gpus == 1", True),
        ("missing == 1", False),
        ("missing != 1", False),  # a missing fact never compares
        ("not missing", True),
        ("tier < 3", False),  # a label that is not a number does not order against one
        ('tier > "a"', True),
        ("gpu == true", False),
        ("mem_gb == 16.0 and mem_gb == 16", True),
    ],
)
def test_evaluate(text: str, expected: bool) -> None:
    assert matches(text, FACTS) is expected


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("", 0),
        ("gpu ==", 6),
        ("gpu = 1", 4),
        ("(gpu == 1", 9),
        ("gpu == 1 and", 12),
        ("gpu in 1", 7),
        ("gpu not == 1", 8),
        ('x == "\\q"', 5),
        ("x == 1e999", 5),
        ("a == 1 b", 7),
        ("x in [1 2]", 8),
        ("eval('1')", 4),
    ],
)
def test_errors_point_at_the_token(text: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    assert info.value.position == position  # type: ignore[attr-defined]
    lines = str(info.value).splitlines()
    assert lines[0].startswith("bad selector: ")
    assert lines[2].index("^") - 2 == position


def test_depth_and_length_are_bounded() -> None:
    with pytest.raises(SelectorError, match="nested deeper"):
        parse("(" * 100 + "a" + ")" * 100)
    with pytest.raises(SelectorError, match="nested deeper"):
        parse("not " * 100 + "a")
    with pytest.raises(SelectorError, match="longer than"):
        parse("a == 1 or " * 100 + "a")


def test_canonical_text_is_one_per_meaning() -> None:
    assert canonical("a==1 and (b==2 and c==3)") == "a == 1 and b == 2 and c == 3"
    assert canonical("(a or b) and c") == "(a or b) and c"
    assert canonical("mem_gb >= 8.0") == canonical("mem_gb>=8")
    assert canonical("x in ['a','b',]") == 'x in ["a", "b"]'
    assert canonical("x == True") == "x == true"


def test_task_spec_validates_selector_and_resources() -> None:
    with pytest.raises(ValueError, match="bad selector"):
        TaskSpec(id="t", kind="call", payload=b"x", select="gpu >")
    with pytest.raises(ValueError, match="unknown resource"):
        TaskSpec(id="t", kind="call", payload=b"x", resources={"tpus": 1})
    with pytest.raises(ValueError, match="positive"):
        TaskSpec(id="t", kind="call", payload=b"x", resources={"cpus": 0})


def test_constraint_key_keeps_the_labels_form() -> None:
    plain = TaskSpec(id="t", kind="call", payload=b"x", labels={"b": "2", "a": "1"})
    assert plain.constraint_key() == "a=1,b=2"
    assert TaskSpec(id="t", kind="call", payload=b"x").constraint_key() == ""
    spec = TaskSpec(
        id="t", kind="call", payload=b"x", labels={"a": "1"}, select="gpu==1", resources={"cpus": 2}
    )
    c = parse_key(spec.constraint_key())
    assert c.labels == {"a": "1"}
    assert c.resources == {"cpus": 2}
    assert str(c.select) == "gpu == 1"
    assert labels_match(spec.constraint_key(), {"a": "1"})
    assert not labels_match(spec.constraint_key(), {"a": "2"})
    assert c.fits({"cpus": 5}, 10) == 2
    assert c.fits({}, 10) == 0
    assert not c.admits(FACTS)  # lacks the label a=1
    assert parse_key("").select is None


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_fuzz_text_raises_only_selector_error(text: str) -> None:
    try:
        tree = parse(text)
    except SelectorError:
        return
    assert canonical(str(tree)) == str(tree)
    selector.evaluate(tree, FACTS)


_ALPHABET = st.sampled_from(
    [*list("abcxyz_01 ()[]=!<>,.'\"-"), "and", "or", "not", "in", "true", " == ", " in "]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_ALPHABET, max_size=30).map("".join))
def test_fuzz_near_miss_tokens(text: str) -> None:
    try:
        tree = parse(text)
    except SelectorError:
        return
    assert str(parse(str(tree))) == str(tree)


_names = st.sampled_from(["gpu", "zone", "data.disk", "rack.row", "missing", "node", "cpus"])
_literals = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.text(max_size=8),
)
_leaf = st.one_of(
    st.builds(
        selector.Compare,
        st.builds(lambda n: selector.Name(tuple(n.split("."))), _names),
        st.sampled_from(["==", "!=", "<", "<=", ">", ">="]),
        _literals,
    ),
    st.builds(
        selector.In,
        st.builds(lambda n: selector.Name(tuple(n.split("."))), _names),
        st.lists(_literals, max_size=3).map(tuple),
        st.booleans(),
    ),
)
_trees = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(selector.Not, inner),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: selector.And(tuple(xs))),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: selector.Or(tuple(xs))),
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_generated_selectors_round_trip(tree: selector.Node) -> None:
    text = str(tree)
    if len(text) > selector.MAX_SELECTOR:
        return
    again = parse(text)
    assert str(again) == canonical(text)
    assert selector.evaluate(again, FACTS) == selector.evaluate(parse(str(again)), FACTS)
