"""Property tests of the request parsers: any bytes give a parse or a 4xx error, never a crash."""

import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.errors import ServiceError
from app.api.parsing import ScoreRequest, parse_json, parse_npy

FEATURES = ["a", "b", "c"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)


def outcome(parse, *args) -> ScoreRequest | None:
    try:
        parsed = parse(*args)
    except ServiceError as e:
        assert 400 <= e.status < 500, e
        assert isinstance(e.message, str) and e.message
        return None
    assert isinstance(parsed, ScoreRequest)
    assert parsed.x.dtype == np.float64 and parsed.x.ndim == 2 and parsed.x.shape[1] == len(FEATURES)
    assert 1 <= parsed.x.shape[0] <= 50 and np.isfinite(parsed.x).all()
    return parsed


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_4xx(body):
    outcome(parse_json, body, FEATURES, 50)
    outcome(parse_npy, body, FEATURES, 50, {})


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_document_parses_or_4xx(document):
    outcome(parse_json, json.dumps(document).encode(), FEATURES, 50)
    outcome(parse_json, json.dumps({"instances": document}).encode(), FEATURES, 50)


@settings(max_examples=300)
@given(
    st.lists(
        st.lists(
            st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**30), 10**30),
            min_size=3,
            max_size=3,
        ),
        min_size=1,
        max_size=20,
    )
)
def test_numeric_rows_are_accepted_exactly_when_finite_and_in_range(rows):
    body = json.dumps({"instances": rows}).encode()  # NaN and Infinity as Python writes them
    parsed = outcome(parse_json, body, FEATURES, 50)
    values = np.array(rows, dtype=np.float64)
    acceptable = bool(np.all(np.abs(values) <= 1e15))
    assert (parsed is not None) == acceptable
    if parsed is not None:
        np.testing.assert_array_equal(parsed.x, values)


@settings(max_examples=200)
@given(st.integers(0, 4), st.integers(0, 5), st.sampled_from(["<f4", "<f8", ">f8", "<i8", "|b1"]))
def test_npy_arrays_of_any_shape_and_dtype(rows, cols, dtype):
    buffer = io.BytesIO()
    np.save(buffer, np.ones((rows, cols), dtype=dtype))
    parsed = outcome(parse_npy, buffer.getvalue(), FEATURES, 50, {})
    assert (parsed is not None) == (rows >= 1 and cols == 3 and dtype in ("<f4", "<f8", ">f8"))


cells = st.floats(-1e6, 1e6) | st.integers(-1000, 1000) | st.booleans() | st.none() | st.text(max_size=3)


@settings(max_examples=400)
@given(
    st.lists(st.lists(cells, min_size=3, max_size=3), min_size=1, max_size=8),
    st.fixed_dictionaries(
        {},
        optional={
            "method": st.text(alphabet='[]"tfn\\ab', max_size=8),
            "explain": st.booleans(),
            "threshold": st.lists(st.floats(0, 1), max_size=2) | st.text(alphabet="[]ab", max_size=3),
        },
    ),
    st.booleans(),
)
def test_list_rows_are_accepted_exactly_when_every_cell_is_a_number(rows, options, options_first):
    """The fast path never lets a string, boolean or null through as a number, whatever brackets,
    quotes or letters the other fields hold, before or after the rows."""
    document = {**options, "instances": rows} if options_first else {"instances": rows, **options}
    body = json.dumps(document).encode()
    parsed = outcome(parse_json, body, FEATURES, 50)
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for row in rows for v in row)
    assert (parsed is not None) == (numbers and not isinstance(options.get("threshold"), list))
    if parsed is not None:
        np.testing.assert_array_equal(parsed.x, np.array(rows, dtype=np.float64))


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ('{"instances": [["1.5", 2, 3]]}', "column 0 ('a'): expected a number, got str"),
        ('{"instances": [[1, 2, 3], {"a": 1, "b": 2, "c": 3}]}', "instances[1] is a dict"),
        ('{"instances": [[1, 2, true]]}', "column 2 ('c'): expected a number, got bool"),
        ('{"instances": [[1, null, 3]]}', "column 1 ('b'): expected a number, got NoneType"),
        ('{"instances": [[1, 2, 3]], "instances": [[4, 5, 6]]}', "duplicate key 'instances'"),
        ('{"instances": [[1, 2, {}]]}', "column 2 ('c'): expected a number, got dict"),
        ('{"instances": [[1, 2, 3]], "method": "[", "method": "]"}', "duplicate key 'method'"),
        ('{"explain": false, "explain": false, "instances": [[1, 2, 3]]}', "duplicate key 'explain'"),
        # integers beyond any float: only Python's parser reads them, and neither numpy nor orjson
        # can take them on
        ('{"instances": [[1, 2, 1' + "0" * 400 + "]]}", "instances[0], column 2 ('c') is int 1000"),
        ('{"instances": [{"a": 1, "b": 1' + "0" * 400 + ', "c": 3}]}', "instances[0], column 1 ('b') is int"),
        ('{"instances": [[1, 2, 3]], "threshold": 1' + "0" * 400 + "}", "'threshold' must be"),
        # escaped quotes in a string stand in for a duplicate key's quotes: counting alone would miss it
        (
            '{"instances": [[1, 2, 3]], "explain": false, '
            '"method": "\\u0022\\u0022\\u0066\\u006c\\u006c", "explain": false}',
            "duplicate key 'explain'",
        ),
    ],
)
def test_fast_path_falls_back_to_the_exact_walk(body, fragment):
    with pytest.raises(ServiceError) as error:
        parse_json(body.encode(), FEATURES, 50)
    assert fragment in error.value.message


def _duplicates_by_pythons_parser(body: bytes) -> bool:
    found = False

    def hook(pairs):  # type: ignore[no-untyped-def]
        nonlocal found
        keys = [k for k, _ in pairs]
        found |= len(keys) != len(set(keys))
        return dict(pairs)

    json.loads(body, object_pairs_hook=hook)
    return found


# Objects written by hand, so keys may repeat; keys and strings from a small alphabet with escapes,
# so the byte counts of reject_duplicate_keys meet every case: a key equal to a value, a key
# inside another string, a key written with an escape.
keys = st.sampled_from(['"a"', '"b"', '"ab"', '"\\u0061"', '"a\\"b"', '","', '":"'])
json_texts = st.recursive(
    st.sampled_from(["1", "2.5", "true", "null", '"a"', '"b a"', '"\\u0062"', '","']),
    lambda children: (
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(keys, children), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{k}: {v}" for k, v in pairs) + "}"
        )
    ),
    max_leaves=16,
)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(json_texts)
def test_the_byte_count_duplicate_check_agrees_with_pythons_parser(text):
    import orjson

    from app.api.parsing import reject_duplicate_keys

    body = text.encode()
    doc = orjson.loads(body)
    try:
        reject_duplicate_keys(body, doc)
        refused = False
    except ServiceError as e:
        assert e.status == 422 and "duplicate key" in e.message
        refused = True
    assert refused == _duplicates_by_pythons_parser(body)
