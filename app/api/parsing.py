"""Request bodies straight into a float64 matrix, with errors that name the row and the column.

JSON is parsed by orjson and its list rows converted by numpy in one pass when the body provably
holds nothing but numbers in them; otherwise the rows are walked one by one to find and name the
first offending value. No per-number pydantic validation: a 1000-row request costs one parse and
one conversion.

The proof costs a few memchr scans, not a pass over every byte. Take the span from the body's
first '[' to its last ']'. If it holds no quote, it holds no string and no key: it can neither
begin or end inside a string nor reach from one field's value into another's, so it is exactly
the value of `instances` (which parsed as a list). Without the letters 't', 'f' and 'n' it holds
no true, false or null; anything else it might hold ({} or NaN) the conversion refuses or
check_values rejects. Outside the span, with no backslash, every string is two quotes, so if the
quotes there match those of the other fields re-serialised, no top-level key occurs twice.
(numpy would silently read true as 1.0, null as nan and "1.5" as 1.5; orjson silently keeps the
last duplicate key.)
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import re
import reprlib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import ValidationError

from app.api.errors import BadRequest, PayloadTooLarge
from app.api.schemas import ReloadRequest
from app.engine.errors import InvalidInput
from app.model.methods import MAX_ABS_VALUE, npy_problem

OPTIONS = ("method", "threshold", "components", "explain")
# Identifiers a JSON request may carry to have them echoed beside the scores: `ids`, one per row, or
# `id_key`, a key of every object row that is no feature. Never scored, never logged.
ID_FIELDS = ("ids", "id_key")
# Integer ids are echoed through orjson, which writes 64-bit integers only.
ID_RANGE = range(-(2**63), 2**63)
KEYS = ("instances", *OPTIONS, *ID_FIELDS)
Body = bytes | bytearray


@dataclass(frozen=True)
class ScoreRequest:
    x: NDArray[np.float64]  # (n, d) raw rows in the bundle's feature order
    method: str | None = None
    threshold: str | float | None = None
    components: bool = False
    explain: bool = False
    ids: list[str | int] | None = None  # echoed in the answer, one per row


# Bounded: a description quotes client input, which may be nested a thousand levels deep.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 40, 40, 4, 4


def describe(value: Any) -> str:
    return f"{type(value).__name__} {_REPR.repr(value)}"


# An error quotes at most this many of a client's names: a row of a million unknown keys must not
# come back as a 24 MB answer.
QUOTED_NAMES = 8


def quoted(names: list[str]) -> list[str]:
    """The first QUOTED_NAMES of a client's names, each cut to 40 characters, and a last entry
    '... (N in all)' when there were more: what an error's message and detail repeat of them."""
    shown = [n if len(n) <= 40 else f"{n[:40]}..." for n in names[:QUOTED_NAMES]]
    return shown + ([f"... ({len(names)} in all)"] if len(names) > QUOTED_NAMES else [])


def _column(features: list[str], j: int) -> str:
    return f"column {j} ('{features[j]}')" if j < len(features) else f"column {j}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def instance(i: int) -> str:
    return f"instances[{i}]"


def check_values(x: NDArray[np.float64], features: list[str], row: Callable[[int], str] = instance) -> None:
    """Refuse NaN, infinities and magnitudes above MAX_ABS_VALUE, naming the first one: its row as
    `row(i)` says (/score's `instances[i]`) and its column."""
    with np.errstate(invalid="ignore"):
        bad = ~(np.abs(x) <= MAX_ABS_VALUE)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        reason = (
            "only finite numbers can be scored"
            if not np.isfinite(x[i, j])
            else f"the limit is {MAX_ABS_VALUE:g}"
        )
        raise InvalidInput(
            f"{row(i)}, {_column(features, j)} is {x[i, j]}: {reason}",
            {"row": i, "column": features[j], "value": str(x[i, j])},
        )


def _only_numbers_in_rows(body: Body, doc: dict[str, Any]) -> bool:
    """Whether `instances` holds only numbers and no key repeats (the module docstring's proof)."""
    start, end = body.find(b"["), body.rfind(b"]")
    if any(body.find(c, start, end) != -1 for c in (b'"', b"t", b"f", b"n")):
        return False
    outside = body[:start] + body[end + 1 :]
    if b"\\" in outside:
        return False
    try:
        rest = orjson.dumps({k: [] if k == "instances" else v for k, v in doc.items()})
    except TypeError:  # an integer beyond 64 bits, which only Python's parser reads
        return False
    return outside.count(b'"') == rest.count(b'"')


def _fast_rows(instances: list[Any], d: int) -> NDArray[np.float64] | None:
    """One conversion of list rows of d numbers each; None where the rows are anything else."""
    if not all(type(row) is list for row in instances) or set(map(len, instances)) != {d}:
        return None
    try:
        values = np.fromiter(itertools.chain.from_iterable(instances), np.float64, len(instances) * d)
    except (ValueError, TypeError, OverflowError):  # null, a nested list, an integer too large
        return None
    return values.reshape(len(instances), d)


def _check_cell(value: Any, i: int, j: int, features: list[str]) -> None:
    """Refuse a cell that is no number, or an integer beyond any float (Python's parser, which
    reads what orjson refuses, keeps integers of hundreds of digits exactly)."""
    if not _is_number(value):
        raise InvalidInput(
            f"instances[{i}], {_column(features, j)}: expected a number, got {describe(value)}",
            {"row": i, "column": features[j]},
        )
    if isinstance(value, int) and abs(value) > MAX_ABS_VALUE:
        raise InvalidInput(
            f"instances[{i}], {_column(features, j)} is {describe(value)}: the limit is {MAX_ABS_VALUE:g}",
            {"row": i, "column": features[j]},
        )


def _rows_from_lists(instances: list[Any], features: list[str], only_numbers: bool) -> NDArray[np.float64]:
    d = len(features)
    if only_numbers and (x := _fast_rows(instances, d)) is not None:
        return x
    # Slow path: find and name the first problem exactly.
    for i, row in enumerate(instances):
        if not isinstance(row, list):
            raise InvalidInput(
                f"instances[{i}] is a {type(row).__name__}; rows must all be lists or all objects",
                {"row": i},
            )
        if len(row) != d:
            raise InvalidInput(
                f"instances[{i}] has {len(row)} values; the model takes {d} features in this order: "
                f"{', '.join(features)}",
                {"row": i, "values": len(row), "expected": d},
            )
        for j, value in enumerate(row):
            _check_cell(value, i, j, features)
    return np.array(instances, dtype=np.float64)


def _normalisation_hint(missing: list[str], row: dict[str, Any]) -> str:
    """Where a key is a missing feature's name in another Unicode normal form (a client that sends
    'é' as 'e' and a combining accent), say so: the two print alike."""
    forms = {unicodedata.normalize("NFC", f) for f in missing}
    if any(unicodedata.normalize("NFC", k) in forms for k in itertools.islice(row, QUOTED_NAMES * 8)):
        return " (a key differs from a feature only in its Unicode normal form: send the model's spelling)"
    return ""


def _rows_from_objects(
    instances: list[Any], features: list[str], id_key: str | None
) -> tuple[NDArray[np.float64], list[Any] | None]:
    """The rows, and each row's `id_key` value when the request declares one."""
    known = set(features)
    if id_key in known:
        raise InvalidInput(
            f"'id_key' {_REPR.repr(id_key)} is a feature of the model; name a key of the rows that is none"
        )
    out = np.empty((len(instances), len(features)), dtype=np.float64)
    ids: list[Any] | None = None if id_key is None else []
    for i, given in enumerate(instances):
        if not isinstance(given, dict):
            raise InvalidInput(
                f"instances[{i}] is a {type(given).__name__}; rows must all be objects or all lists",
                {"row": i},
            )
        row = given
        if ids is not None:
            if id_key not in row:
                declared = f"instances[{i}] has no {_REPR.repr(id_key)}, the declared id_key"
                raise InvalidInput(declared, {"row": i})
            row = {k: v for k, v in given.items() if k != id_key}
            ids.append(_check_id(given[id_key], f"instances[{i}][{_REPR.repr(id_key)}]", i))
        if len(row) != len(features) or not known.issuperset(row):
            missing = [f for f in features if f not in row]
            unknown = quoted([k for k in row if k not in known])
            raise InvalidInput(
                f"instances[{i}]: missing features {missing}, unknown features {unknown}"
                + _normalisation_hint(missing, row),
                {"row": i, "missing": missing, "unknown": unknown},
            )
        values = [row[f] for f in features]
        for j, value in enumerate(values):
            _check_cell(value, i, j, features)
        out[i] = values
    return out, ids


def _check_id(value: Any, where: str, row: int) -> str | int:
    """An id is a string or an integer of at most 64 bits: what any client can read back exactly."""
    if type(value) is str or (type(value) is int and value in ID_RANGE):
        return value
    kind = "an integer beyond 64 bits" if type(value) is int else describe(value)
    raise InvalidInput(f"{where}, an id, must be a string or a 64-bit integer, got {kind}", {"row": row})


def _ids(doc: dict[str, Any], n: int, by_name: bool) -> tuple[list[Any] | None, str | None]:
    """`ids` (one string or integer per row) or `id_key` (object rows only), checked."""
    ids, id_key = doc.get("ids"), doc.get("id_key")
    if ids is not None and id_key is not None:
        raise InvalidInput("send ids or id_key, not both")
    if id_key is not None and (not isinstance(id_key, str) or not by_name):
        raise InvalidInput("'id_key' names a key of the object rows: a string, with rows as objects")
    if ids is not None:
        if not isinstance(ids, list) or len(ids) != n:
            raise InvalidInput(f"'ids' must be a list of one id per row ({n}), got {describe(ids)}")
        for i, value in enumerate(ids):
            _check_id(value, f"ids[{i}]", i)
    return ids, id_key


# Python's parser reads what orjson refuses (NaN, Infinity, numbers beyond the float range), so that
# the caller can name the row that holds one. It holds the GIL, at ~100 ms per MiB of such a body:
# larger bodies are not parsed twice, their error is located from orjson's position instead.
REPARSE_BYTES = 64 * 1024
_LIST_ROWS_START = re.compile(rb'\s*\{\s*"instances"\s*:\s*\[')
_TOKEN = re.compile(rb"-?[\w.+-]{1,40}")
_NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")


def load_json(body: Body, features: list[str] | None = None, what: str = "the body") -> Any:
    """The parsed document. Where orjson refuses it and the body is small, Python's parser (see
    REPARSE_BYTES); where large, the error names the refused text and, for rows of a /score body
    in their usual form (`features` given), its row and column."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as strict_error:
        if "UTF-8" in str(strict_error):  # orjson names neither the byte nor where it is
            try:
                bytes(body).decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRequest(
                    f"{what} is not valid UTF-8, which JSON must be: byte 0x{e.object[e.start]:02x} at "
                    f"byte {e.start} ({e.reason})",
                    {"byte": e.start},
                ) from None
        if len(body) > REPARSE_BYTES:
            raise _located(bytes(body), strict_error, features, what) from None
        # Python's parser also accepts what orjson rightly refuses, lone surrogates (a \\ud800
        # escape), which no UTF-8 text can hold: writing the document back as UTF-8 finds them.
        try:
            doc = json.loads(bytes(body).decode("utf-8"), parse_constant=float)
            json.dumps(doc, ensure_ascii=False).encode("utf-8")
        except (UnicodeError, ValueError, RecursionError):
            raise BadRequest(f"{what} is not valid JSON: {strict_error}") from None
        return doc


def _located(
    body: bytes, error: orjson.JSONDecodeError, features: list[str] | None, what: str
) -> BadRequest | InvalidInput:
    """orjson's refusal of a large body, with the text it refused and, where the rows before it are
    lists of plain numbers, the row and column that hold it. orjson counts characters, so the
    position is a byte offset only where the text before it is ASCII."""
    pos = error.pos
    if pos > 0 and body[pos - 1 : pos] == b"-":  # orjson points past the sign of -Infinity
        pos -= 1
    token = _TOKEN.match(body, pos) if body[:pos].isascii() else None
    found = f" ({token.group().decode('ascii', 'replace')!r})" if token else ""
    # A number refused for its value (NaN, an infinity, one beyond the float range) is a 422, as in a
    # small body; malformed text ("1.e5", "0x10") is no value at all: 400.
    if token is None or not (token.group() in _NON_FINITE or "infinity when parsed" in str(error)):
        return BadRequest(f"{what} is not valid JSON: {error}{found}")
    text = token.group().decode("ascii")
    reason = (
        f"the limit is {MAX_ABS_VALUE:g}"
        if text.lstrip("-").isdigit()
        else "only finite numbers can be scored, and JSON has no NaN or Infinity"
    )
    start = _LIST_ROWS_START.match(body)
    if features is not None and start:
        rows = body[start.end() : pos]
        opened = rows.count(b"[")
        if opened and opened == rows.count(b"]") + 1 and not any(c in rows for c in (b'"', b"{")):
            i, j = opened - 1, rows[rows.rfind(b"[") + 1 :].count(b",")
            return InvalidInput(
                f"instances[{i}], {_column(features, j)} is {text}: {reason}",
                {"row": i, "column": features[j] if j < len(features) else j},
            )
    # not located in a row (object rows, /v2's data), but refused for what it is all the same
    return InvalidInput(f"{what} holds {text} at character {pos}: {reason}", {"position": pos})


# Beyond this many distinct strings, counting each one's occurrences in the body costs more than
# Python's parser does.
MAX_COUNTED_STRINGS = 64
_SCALARS = frozenset({int, float, bool, type(None)})


def _strings_in(doc: Any) -> Counter[str] | None:
    """How often each string occurs in a parsed document, as a key or as a value; None beyond
    MAX_COUNTED_STRINGS distinct ones."""
    counts: Counter[str] = Counter()
    stack = [doc]
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            counts.update(value.keys())
            stack.extend(value.values())
        elif kind is list:
            if not _SCALARS.issuperset(map(type, value)):  # a list of numbers holds no string
                stack.extend(value)
        elif kind is str:
            counts[value] += 1
        if len(counts) > MAX_COUNTED_STRINGS:
            return None
    return counts


def reject_duplicate_keys(body: Body, doc: Any = None) -> None:
    """orjson keeps the last of duplicate keys silently; Python's parser shows every pair.

    Given orjson's `doc`, a few byte counts usually prove there is none, without the second parse
    (which costs 5-10 times orjson's). In a body without a backslash every string is written
    literally, so each string s of the document occurs in the body as the bytes "s" at least as
    often as the document holds it (keys and values); a duplicate key that orjson dropped is one
    occurrence more. So if every count is exactly the document's, no key repeats. Where a count
    differs (a duplicate, or "s" inside another string), or a backslash could hide a string's
    bytes, Python's parser decides."""
    counts = _strings_in(doc) if doc is not None and b"\\" not in body else None
    if counts is not None and all(body.count(b'"%s"' % s.encode()) == n for s, n in counts.items()):
        return

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise InvalidInput(f"duplicate key {key!r} in a JSON object", {"key": key})
            seen.add(key)
        return dict(pairs)

    try:
        json.loads(body, object_pairs_hook=pairs_hook, parse_constant=float)
    except RecursionError:  # orjson reads 1024 levels, Python's parser fewer
        raise BadRequest("the body nests arrays or objects too deeply") from None


def _options(doc: dict[str, Any]) -> dict[str, Any]:
    method = doc.get("method")
    if method is not None and not isinstance(method, str):
        raise InvalidInput(f"'method' must be a string, got {describe(method)}", {"field": "method"})
    threshold = doc.get("threshold")
    if _is_number(threshold):
        with contextlib.suppress(OverflowError):  # an integer beyond any float is no rate either
            threshold = float(threshold)
    if threshold is not None and not isinstance(threshold, str | float):
        raise InvalidInput(
            f"'threshold' must be a threshold's name or a false-positive rate, got {describe(threshold)}",
            {"field": "threshold"},
        )
    flags = {}
    for flag in ("components", "explain"):
        value = doc.get(flag, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"'{flag}' must be true or false, got {describe(value)}", {"field": flag})
        flags[flag] = value
    return {"method": method, "threshold": threshold, **flags}


def parse_json(body: Body, features: list[str], max_rows: int) -> ScoreRequest:
    doc = load_json(body, features)
    if not isinstance(doc, dict):
        raise InvalidInput('the body must be a JSON object such as {"instances": [[...], ...]}')
    unknown = quoted([k for k in doc if k not in KEYS])
    if unknown:
        raise InvalidInput(f"unknown fields {unknown}; accepted: {list(KEYS)}", {"unknown": unknown})
    if "instances" not in doc:
        raise InvalidInput("'instances' is missing: send {\"instances\": [[...], ...]}")
    instances = doc["instances"]
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list of rows")
    if len(instances) > max_rows:
        raise PayloadTooLarge(
            f"{len(instances)} rows in one request; the limit is {max_rows}",
            {"rows": len(instances), "limit": max_rows},
        )
    # The options first: a malformed one is refused before the costlier duplicate-key pass.
    options = _options(doc)
    by_name = isinstance(instances[0], dict)
    ids, id_key = _ids(doc, len(instances), by_name)
    only_numbers = not by_name and _only_numbers_in_rows(body, doc)
    if not only_numbers:  # where the rows are proven numbers, the proof covers the keys too
        reject_duplicate_keys(body, doc)
    if by_name:
        x, keyed = _rows_from_objects(instances, features, id_key)
        ids = keyed if keyed is not None else ids
    else:
        x = _rows_from_lists(instances, features, only_numbers)
    check_values(x, features)
    return ScoreRequest(x=x, ids=ids, **options)


NPY_DTYPES = (np.dtype("<f4"), np.dtype("<f8"), np.dtype(">f4"), np.dtype(">f8"))


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    if value.lower() in ("true", "1"):
        return True
    if value.lower() in ("false", "0"):
        return False
    raise InvalidInput(
        f"query parameter '{name}' must be true or false, got {_REPR.repr(value)}", {"field": name}
    )


# Bodies the event loop parses itself. Parsing holds the GIL, so a worker thread adds no parallelism,
# only two hand-offs, which cost 1000-row batches about 18% of their throughput; a thread is for the
# bodies whose parse could keep the loop from answering for long. Measured on one core: a .npy body
# costs its header and vectorised checks (~0.3 ms per MiB); JSON rows of numbers about 9 ms per MiB;
# anything else (objects, strings, options of any shape) up to ~120 ms per MiB when crafted.
INLINE_NPY_BYTES = 1024 * 1024
INLINE_NUMBERS_BYTES = 1024 * 1024
INLINE_OTHER_BYTES = 64 * 1024


def parse_is_cheap(body: Body, content_type: str) -> bool:
    """Whether `body` parses in milliseconds at worst, whatever it holds: small enough for its kind.
    JSON counts as numbers when no quote, letter t, f or n lies between its first '[' and its last
    ']' (three memchr scans; the module docstring's argument)."""
    size = len(body)
    if size < INLINE_OTHER_BYTES:
        return True
    if content_type == "application/x-npy":
        return size < INLINE_NPY_BYTES
    if size >= INLINE_NUMBERS_BYTES:
        return False
    start, end = body.find(b"["), body.rfind(b"]")
    return start != -1 and not any(body.find(c, start, end) != -1 for c in (b'"', b"t", b"f", b"n"))


def check_query(content_type: str, items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The query's options, each given once. Options of a JSON request go in its body, of a .npy
    request in the query; nothing else."""
    accepted = list(OPTIONS) if content_type == "application/x-npy" else []
    pairs = list(items)
    unknown = quoted([k for k, _ in pairs if k not in accepted])
    if unknown:
        where = "query parameters" if accepted else "query parameters (JSON options go in the body)"
        raise InvalidInput(f"unknown {where} {unknown}; accepted: {accepted}", {"unknown": unknown})
    query = dict(pairs)
    if len(query) < len(pairs):  # which of two values was meant is not ours to guess
        repeated = sorted(k for k, count in Counter(k for k, _ in pairs).items() if count > 1)
        raise InvalidInput(f"query parameters {repeated} given more than once", {"repeated": repeated})
    return query


def _npy_matrix(body: Body, features: list[str], max_rows: int) -> NDArray[np.floating]:
    """The matrix of a .npy body, its header checked against the bytes that follow before anything
    is allocated (np.load allocates what a header promises first), and viewed, not copied."""
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version} is not 1.0 or 2.0")
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        reason = npy_problem(e)
        raise BadRequest(f"the body is not a valid .npy array: {reason[:300]}") from None
    if dtype not in NPY_DTYPES:
        raise InvalidInput(f"the array's dtype is {dtype}; send float32 or float64")
    # numpy's header check lets booleans through as integers ('shape': (True, 30)).
    if len(shape) != 2 or any(type(n) is not int for n in shape) or shape[0] <= 0 or shape[1] < 0:
        raise InvalidInput(f"the array has shape {shape}; send a non-empty (rows, {len(features)}) matrix")
    rows, columns = shape
    if rows > max_rows:
        detail = {"rows": rows, "limit": max_rows}
        raise PayloadTooLarge(f"{rows} rows in one request; the limit is {max_rows}", detail)
    if columns != len(features):
        raise InvalidInput(
            f"the array has {columns} columns; the model takes {len(features)} features in this order: "
            f"{', '.join(features)}",
            {"values": columns, "expected": len(features)},
        )
    offset = stream.tell()
    promised, present = rows * columns * dtype.itemsize, len(body) - offset
    if promised != present:
        raise BadRequest(
            f"the .npy header promises {shape} {dtype} ({promised} bytes of data); the body holds {present}",
            {"promised": promised, "present": present},
        )
    x = np.frombuffer(body, dtype=dtype, count=rows * columns, offset=offset)
    return x.reshape(shape, order="F" if fortran_order else "C")


def parse_npy(body: Body, features: list[str], max_rows: int, query: dict[str, str]) -> ScoreRequest:
    """A .npy file (float32 or float64, 2-D, rows in feature order); options as query parameters."""
    query = check_query("application/x-npy", query.items())
    x = np.ascontiguousarray(_npy_matrix(body, features, max_rows), dtype=np.float64)
    check_values(x, features)
    return ScoreRequest(
        x=x,
        method=query.get("method"),
        threshold=query.get("threshold"),  # a name or a rate's text, as the server's default is
        components=_flag(query.get("components"), "components"),
        explain=_flag(query.get("explain"), "explain"),
    )


def parse_reload(body: Body) -> ReloadRequest:
    # Python's parser: a reload body is small, and any integer it holds is still JSON. Decoded here,
    # since json.loads of bytes also takes UTF-16 and UTF-32, which the content type does not allow;
    # and written back, since it takes lone surrogates (a \\ud800 escape) that no UTF-8 text holds.
    try:
        doc = json.loads(bytes(body).decode("utf-8"))
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # UnicodeError is a ValueError
        raise BadRequest(f"the body is not valid UTF-8 JSON: {e}") from None
    reject_duplicate_keys(body, doc)
    try:
        return ReloadRequest.model_validate(doc)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, er['loc'])) or 'body'}: {er['msg']}" for er in e.errors())
        raise InvalidInput(f"invalid reload request: {problems}", {"accepted": ["path"]}) from None
