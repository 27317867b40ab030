"""Server-side checks on what a client sends back.

Flower's strategies only check that replies are *consistent with each other*
(one ArrayRecord, one MetricRecord, same keys) and raise if they are not, which
stops the whole run. A federated face-recognition server must instead expect
individual bad replies: a private head returned by mistake, a model of another
preset, NaNs from a diverged client, or a deliberately scaled update. These
functions compare each reply with the global arrays the server itself sent, so a
bad reply can be dropped with a readable reason while the round goes on.

`validate_reply_content` also bounds what a reply may carry besides the update
(metric and config keys, key length, list length, string size, the weight
`num-examples`): a site that does not run our outbound guard must not be able to
smuggle data through metrics, bloat `metrics.jsonl`, or take over FedAvg.  Every
name a reply controls is truncated before it reaches a log line or a reason.
"""

import functools
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import NDArray
from flwr.common.constant import SType

MAX_LISTED_KEYS = 8
BLOCK = 1 << 18  # elements per scratch block of the norm (1-2 MiB: stays in cache)

# Bounds on the non-array part of a reply.  Our clients send ~10 scalar metrics and no
# ConfigRecord; the list and string bounds match the outbound guard (clients/guard.py).
MAX_METRIC_KEYS = 256          # over all MetricRecords of a reply
MAX_CONFIG_KEYS = 64           # over all ConfigRecords of a reply
MAX_RECORDS = 8                # records of any kind in one reply
MAX_KEY_CHARS = 128            # a record name or a key
MAX_LIST_LEN = 64              # a metric or config list
MAX_CONFIG_STR = 256           # a config string or bytes value
MAX_REASON_CHARS = 256         # text a node controls (error reasons) quoted in a problem
INT64_MAX = 2**63 - 1          # what Flower's wire format carries for an int


def short(text: str, limit: int = MAX_KEY_CHARS) -> str:
    """`text` cut to `limit` characters (with a note of how much was cut)."""
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


def name_of(key: object) -> str:
    """repr of a name a sender chose, truncated: no unbounded key names in logs."""
    return short(repr(key))


def _fmt_keys(keys: Sequence[str]) -> str:
    """List keys readably without flooding the log for a wholly wrong model."""
    shown = ", ".join(name_of(k) for k in keys[:MAX_LISTED_KEYS])
    rest = len(keys) - MAX_LISTED_KEYS
    return f"{shown}, ... (+{rest} more)" if rest > 0 else shown


def _as_numpy(value: Array | NDArray) -> NDArray:
    return value if isinstance(value, np.ndarray) else array_view(value)


def array_view(array: Array) -> NDArray:
    """The array as a read-only NumPy view of the bytes received: no copy.

    Flower's `Array.numpy()` runs `np.load` on the bytes, which copies every array; a server
    reads each reply twice (validation, then averaging), so that was two full copies of every
    update per round.  The header is read by NumPy's own `numpy.lib.format` readers, as
    `np.load` does, and remembered (a model's headers repeat every round); object dtypes and
    short data are refused.
    """
    if array.stype != SType.NUMPY:
        raise TypeError(f"unsupported serialization type {array.stype!r} (expected "
                        f"{SType.NUMPY!r})")
    data = array.data
    if len(data) < 12 or data[6] not in (1, 2):      # rare .npy versions: NumPy's own path
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4             # header-length field of format 1.0 / 2.0
    offset = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    shape, fortran_order, dtype = _npy_header(bytes(data[:offset]))
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"data holds {len(data) - offset} bytes, header says "
                         f"{count * dtype.itemsize} ({dtype}{list(shape)})")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=8192)
def _npy_header(prefix: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy prefix (magic, version, header)."""
    fp = io.BytesIO(prefix)
    version = np.lib.format.read_magic(fp)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, fortran_order, dtype = read(fp)
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    return tuple(shape), bool(fortran_order), dtype


def nonfinite_count(value: NDArray) -> int:
    """Number of NaN/Inf entries: one summing pass without temporaries in the common case.

    A NaN or Inf makes the sum non-finite, so a finite sum proves there is none; only a
    non-finite sum (a bad value, or finite values whose sum overflowed) pays for the exact
    count.  float16 is summed in float32, where a sum of float16 values cannot overflow."""
    flat = value.reshape(-1)
    with np.errstate(invalid="ignore", over="ignore"):
        total = np.add.reduce(flat, dtype=np.float32 if flat.dtype == np.float16 else None)
    if np.isfinite(total):
        return 0
    return int(flat.size - np.count_nonzero(np.isfinite(flat)))


def squared_distance(value: NDArray, expected: NDArray) -> float:
    """||value - expected||^2, block by block through one cache-sized scratch buffer (no
    full-size temporaries).  Within a block the difference and its dot product run in the
    arrays' own precision when that is float32 (BLAS; 2.5-3x faster than float64, measured),
    and the block sums add up in float64: about 1e-6 relative error, ample for a bound check.
    Other dtypes go through float64."""
    a, b = value.reshape(-1), expected.reshape(-1)
    work = np.float32 if a.dtype == b.dtype == np.float32 else np.float64
    scratch = np.empty(min(BLOCK, a.size), work)
    total = 0.0
    for lo in range(0, a.size, BLOCK):
        hi = min(lo + BLOCK, a.size)
        d = scratch[:hi - lo]
        np.subtract(a[lo:hi], b[lo:hi], out=d, dtype=work)
        total += float(np.dot(d, d))
    return total


def reference_to_numpy(reference: ArrayRecord) -> dict[str, NDArray]:
    """Read-only views of a record's arrays (`array_view`: no copy)."""
    return {key: array_view(array) for key, array in reference.items()}


# pylint: disable=too-many-locals,too-many-branches
def validate_update(
    arrays: ArrayRecord,
    reference: ArrayRecord | Mapping[str, NDArray],
    max_update_norm: float | None = None,
    *,
    max_bytes: int | None = None,
) -> list[str]:
    """Return the problems of `arrays` as an update of `reference` (empty = valid).

    Checks, in order: total size (before anything is decoded), key set, each
    array's shape and dtype (both its declared header and its decoded data, since
    a sender controls both), finiteness, and the L2 norm of ``arrays - reference``
    over all floating-point arrays. Integer buffers such as BatchNorm's
    ``num_batches_tracked`` are counters, not weights: they are checked for shape
    and dtype but left out of the norm, where they would otherwise dominate.
    """
    problems: list[str] = []
    if max_bytes is not None:
        size = arrays.count_bytes()
        if size > max_bytes:
            # Do not decode an oversized payload at all
            return [f"oversized update: {size} bytes > limit {max_bytes}"]

    missing = [key for key in reference if key not in arrays]
    extra = [key for key in arrays if key not in reference]
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_fmt_keys(extra)}")

    squared_norm = 0.0
    for key in reference:
        if key not in arrays:
            continue
        expected = _as_numpy(reference[key])
        sent = arrays[key]
        try:
            value = array_view(sent)
        except (TypeError, ValueError, OSError, EOFError) as exc:
            problems.append(f"{key!r}: cannot decode array ({short(str(exc), MAX_REASON_CHARS)})")
            continue
        if tuple(sent.shape) != value.shape or sent.dtype != str(value.dtype):
            problems.append(
                f"{key!r}: header says {sent.dtype}{list(sent.shape)} but data is "
                f"{value.dtype}{list(value.shape)}"
            )
            continue
        if value.shape != expected.shape:
            problems.append(
                f"{key!r}: shape {list(value.shape)} != expected "
                f"{list(expected.shape)}"
            )
            continue
        if value.dtype != expected.dtype:
            problems.append(
                f"{key!r}: dtype {value.dtype} != expected {expected.dtype}"
            )
            continue
        if not np.issubdtype(value.dtype, np.inexact):
            continue
        num_bad = nonfinite_count(value)
        if num_bad:
            problems.append(f"{key!r}: {num_bad} non-finite value(s) (NaN/Inf)")
            continue
        if max_update_norm is not None:                 # the norm is only needed for the bound
            squared_norm += squared_distance(value, expected)

    if max_update_norm is not None:
        norm = math.sqrt(squared_norm)
        if norm > max_update_norm:
            problems.append(
                f"update norm {norm:.6g} exceeds max_update_norm {max_update_norm:.6g}"
            )
    return problems


def validate_reply_content(
    content: RecordDict,
    *,
    weighted_by_key: str = "num-examples",
    arrayrecord_key: str | None = "arrays",
    max_num_examples: int | None = None,
) -> list[str]:
    """Return structural problems of a reply (empty = valid).

    Mirrors Flower's `validate_message_reply_consistency`, but per reply and
    without raising: exactly one ArrayRecord named `arrayrecord_key` (pass None for
    evaluate replies, which must carry none) and exactly one MetricRecord holding the
    weight `weighted_by_key`: a whole number >= 1 and at most `max_num_examples`
    (None: no cap).  ConfigRecords are allowed within the bounds above, and every
    metric and config value must be within them too (`_record_problems`).
    """
    problems = _shape_problems(content, arrayrecord_key)
    if problems:
        return problems
    problems = _record_problems(content)
    metric_names = list(content.metric_records.keys())
    if len(metric_names) != 1:
        problems.append(f"expected exactly one MetricRecord, got [{_fmt_keys(metric_names)}]")
        return problems
    metrics = content.metric_records[metric_names[0]]
    if weighted_by_key not in metrics:
        problems.append(f"MetricRecord lacks the weight {weighted_by_key!r}")
        return problems
    problem = weight_problem(metrics[weighted_by_key], weighted_by_key, max_num_examples)
    if problem:
        problems.append(problem)
    return problems


def _shape_problems(content: RecordDict, arrayrecord_key: str | None) -> list[str]:
    """How many records, and which ArrayRecords, a reply has."""
    if len(content) > MAX_RECORDS:
        return [f"{len(content)} records in one reply (max {MAX_RECORDS})"]
    names = list(content.array_records.keys())
    if arrayrecord_key is None:
        if names:
            return [f"evaluate replies carry no ArrayRecord, got [{_fmt_keys(names)}]"]
    elif names != [arrayrecord_key]:
        return [f"expected exactly one ArrayRecord named {arrayrecord_key!r}, "
                f"got [{_fmt_keys(names)}]"]
    return []


def _record_problems(content: RecordDict) -> list[str]:
    """Bounds on the MetricRecords and ConfigRecords (see the module constants)."""
    problems: list[str] = []
    for kind, records, max_keys in (("MetricRecord", content.metric_records, MAX_METRIC_KEYS),
                                    ("ConfigRecord", content.config_records, MAX_CONFIG_KEYS)):
        num_keys = sum(len(record) for record in records.values())
        if num_keys > max_keys:
            problems.append(f"{kind}s hold {num_keys} keys (max {max_keys})")
            continue
        for name, record in records.items():
            if len(name) > MAX_KEY_CHARS:
                problems.append(f"{kind} name {name_of(name)} is longer than "
                                f"{MAX_KEY_CHARS} characters")
            for key, value in record.items():
                problem = _value_problem(key, value)
                if problem:
                    problems.append(f"{kind} {name_of(name)}: {problem}")
                    if len(problems) >= MAX_LISTED_KEYS:
                        return problems
    return problems


def _value_problem(key: str, value: object) -> str | None:
    """Why one metric/config entry is out of bounds (None: fine)."""
    if len(key) > MAX_KEY_CHARS:
        return f"key {name_of(key)} is longer than {MAX_KEY_CHARS} characters"
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) > MAX_LIST_LEN:
        return f"key {name_of(key)} holds a list of {len(value)} values (max {MAX_LIST_LEN})"
    for item in items:
        if isinstance(item, str | bytes) and len(item) > MAX_CONFIG_STR:
            return (f"key {name_of(key)} holds a {type(item).__name__} of {len(item)} "
                    f"characters (max {MAX_CONFIG_STR})")
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > INT64_MAX:
            return f"key {name_of(key)} holds an integer outside int64"
    return None


def weight_problem(weight: object, key: str = "num-examples",
                   max_num_examples: int | None = None) -> str | None:
    """Why `weight` cannot weight a reply (None: it can).

    A whole number >= 1 (an int, or a float without a fraction), so 0.5, NaN, inf,
    negatives and bools are refused; above `max_num_examples` is refused too, naming
    the cap, rather than clipped: a claim that large is a lie or a misconfiguration.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | float):
        return f"{key!r} must be a number, got {type(weight).__name__}"
    if isinstance(weight, int) and abs(weight) > INT64_MAX:     # before any str() of it
        return f"{key!r} must be a whole number >= 1 within int64"
    if isinstance(weight, float) and not math.isfinite(weight):
        return f"{key!r} must be a finite whole number >= 1, got {weight}"
    if weight < 1 or (isinstance(weight, float) and not weight.is_integer()):
        return f"{key!r} must be a whole number >= 1, got {short(repr(weight), 32)}"
    if max_num_examples is not None and weight > max_num_examples:
        return (f"{key!r} = {weight!r} exceeds max-num-examples {max_num_examples} "
                f"(raise the run-config key 'max-num-examples' if a site really holds more)")
    return None
