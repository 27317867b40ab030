"""Per-round checkpoints and a metrics log that survive a crash mid-write.

Flower persists nothing beyond run logs, so the ServerApp saves state itself.
`checkpoint.pt` is written to a temporary file and swapped in with
`os.replace`, so a reader sees either the old or the new file, never half of
one; the one it replaces is kept as `checkpoint.prev.pt`. Checkpoints hold only
tensors and plain Python types so they load with `torch.load(weights_only=True)`,
which cannot execute code from a tampered file.

`metrics.jsonl` is appended one line per write.  A crash mid-append leaves a torn last line:
readers skip any line that is not a JSON object (warning with file and line number), and the
next append first repairs the tail, moving a torn fragment to `metrics.jsonl.torn` (never
deleting it), so every later line stays a valid JSON line.

A corrupt `checkpoint.pt` is never replaced automatically: resuming from the previous round
redoes rounds and is the operator's call, so `CheckpointError` names the exact command
(move the corrupt file aside; `latest()` then uses `checkpoint.prev.pt`).
"""

import json
import os
import shlex
import time
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from minusface.atomic import write_atomic

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
TORN_SUFFIX = ".torn"
_KEYS = {"round": int, "stage": str, "arrays": dict, "extra": dict}


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be used."""


def _to_tensor(value: Any) -> Any:
    import torch  # pylint: disable=import-outside-toplevel

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    return torch.from_numpy(np.array(value, copy=True, order="C"))


def _arrays_to_tensors(arrays: ArrayRecord | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(arrays, ArrayRecord):
        return {key: _to_tensor(array.numpy()) for key, array in arrays.items()}
    return {str(key): _to_tensor(value) for key, value in arrays.items()}


def _plain(value: Any, where: str) -> Any:
    """Convert `value` to what `weights_only=True` loads; fail early, naming it.

    Checked at save time: a value the safe loader rejects would otherwise only
    surface when resuming, i.e. when the run is already lost.
    """
    import torch  # pylint: disable=import-outside-toplevel

    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | torch.Tensor):
        return _to_tensor(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"checkpoint extra{where}: key {key!r} is not str/int")
            out[key] = _plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(
        f"checkpoint extra{where}: {type(value).__name__} cannot be loaded with "
        "weights_only=True; use tensors, arrays or plain Python types"
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """`raw` as a JSON object, or None for anything else (torn, not UTF-8, a list...)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return value if isinstance(value, dict) else None


def numbered_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every JSON-object line of `path` ([] if it does not exist).

    Other lines (a crash's torn tail, a hand edit gone wrong) are skipped with a warning that
    names the file and line number, so one bad line never hides the rest of a run's log.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record = _json_object(raw)
        if record is not None:
            records.append((number, record))
            continue
        torn = number == len(lines) and not data.endswith(b"\n")
        log(WARNING, "%s line %d: %s; skipped", path, number,
            "unfinished last line (a write cut short by a crash?)" if torn
            else "not a JSON object")
    return records


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of `numbered_jsonl`, without line numbers."""
    return [record for _, record in numbered_jsonl(path)]


def array_mismatches(
    found: Mapping[str, Any], expected: Mapping[str, Any], limit: int = 4
) -> list[str]:
    """How the keys and shapes of `found` differ from `expected` (empty: they match)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shape = lambda v: tuple(getattr(v, "shape", ()))  # noqa: E731
    changed = [
        f"{key} {shape(found[key])} (expected {shape(expected[key])})"
        for key in sorted(set(found) & set(expected))
        if shape(found[key]) != shape(expected[key])
    ]
    out = []
    for what, items in (("missing", missing), ("unexpected", unexpected),
                        ("shape differs", changed)):
        if items:
            more = f" and {len(items) - limit} more" if len(items) > limit else ""
            out.append(f"{what}: {', '.join(items[:limit])}{more}")
    return out


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointStore:
    """Round checkpoints (`checkpoint.pt`) and metrics lines (`metrics.jsonl`).

    Parameters
    ----------
    out_dir : Path
        Absolute directory (created if needed). Relative paths are rejected: the
        ServerApp runs in the SuperLink's working directory, not the project's.
    """

    def __init__(self, out_dir: Path | str) -> None:
        out_dir = Path(out_dir)
        if not out_dir.is_absolute():
            raise ValueError(f"out_dir must be an absolute path, got {str(out_dir)!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.checkpoint_path = out_dir / CHECKPOINT
        self.previous_path = out_dir / PREVIOUS
        self.metrics_path = out_dir / METRICS

    # pylint: disable=too-many-arguments
    def save(
        self,
        server_round: int,
        stage: str,
        arrays: ArrayRecord | Mapping[str, Any],
        *,
        extra: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write the round's checkpoint atomically, then log `metrics` for it."""
        import torch  # pylint: disable=import-outside-toplevel

        state = {
            "round": int(server_round),
            "stage": str(stage),
            "arrays": _arrays_to_tensors(arrays),
            "extra": _plain(dict(extra or {}), ""),
        }
        # the replaced checkpoint becomes the previous one: the last finished round is never lost
        write_atomic(self.checkpoint_path, lambda file: torch.save(state, file),
                     backup=self.previous_path)
        _fsync_dir(self.out_dir)
        self.append_metrics(
            {"round": int(server_round), "stage": str(stage), "metrics": metrics or {}}
        )
        return self.checkpoint_path

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON object as a line of `metrics.jsonl` (e.g. per client)."""
        line = json.dumps(dict(record), sort_keys=True, default=_json_default)
        self.repair_metrics_tail()
        with open(self.metrics_path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def repair_metrics_tail(self) -> None:
        """End `metrics.jsonl` with a newline so the next line is a line of its own.

        A complete record that only lacks its newline gets one; a torn fragment is appended to
        `metrics.jsonl.torn` (synced first: a crash here duplicates it, never loses it) and then
        cut from the log.  The common case costs one byte read.
        """
        path = self.metrics_path
        size = path.stat().st_size if path.exists() else 0
        if size == 0:
            return
        with open(path, "rb+") as file:
            file.seek(size - 1)
            if file.read(1) == b"\n":
                return
            file.seek(0)
            data = file.read()
            start = data.rfind(b"\n") + 1
            fragment, number = data[start:], data.count(b"\n", 0, start) + 1
            if _json_object(fragment) is None:
                torn = path.with_name(path.name + TORN_SUFFIX)
                with open(torn, "ab") as out:
                    out.write(fragment + b"\n")
                    out.flush()
                    os.fsync(out.fileno())
                file.truncate(start)
                log(WARNING, "%s line %d was cut short (a crash mid-write?): moved its %d "
                    "bytes to %s", path, number, len(fragment), torn)
            else:
                file.seek(size)
                file.write(b"\n")
                log(WARNING, "%s line %d lacked its newline; added", path, number)
            file.flush()
            os.fsync(file.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All records of `metrics.jsonl`; bad lines are skipped with a warning (`read_jsonl`)."""
        return read_jsonl(self.metrics_path)

    def latest(self) -> dict[str, Any] | None:
        """The newest checkpoint, or None if no round has finished yet.

        Raises `CheckpointError` naming the file if it is corrupt; the previous
        round's checkpoint is still available via `previous()`.
        """
        if self.checkpoint_path.exists():
            return self._load(self.checkpoint_path)
        if self.previous_path.exists():
            # Crash between the two renames of `save`: the previous one is newest
            log(WARNING, "%s missing; using %s", self.checkpoint_path, PREVIOUS)
            return self._load(self.previous_path)
        return None

    def previous(self) -> dict[str, Any] | None:
        """The checkpoint before the newest one, or None."""
        if not self.previous_path.exists():
            return None
        return self._load(self.previous_path)

    def recovery_hint(self, path: Path) -> str:
        """What an operator can do about unusable `path`; nothing is changed automatically."""
        other = self.previous_path
        if path == other or not other.exists():
            return (f"no earlier checkpoint is usable; start again with a new out-dir "
                    f"(or move {self.out_dir}'s files elsewhere first)")
        try:
            round_ = f"round {int(self._load(other, hint=False)['round'])}"
        except CheckpointError as exc:
            return f"the previous checkpoint is unusable too ({exc}); use a new out-dir"
        aside = self.out_dir / time.strftime("checkpoint.corrupt-%Y%m%d-%H%M%S.pt")
        return (
            f"nothing was changed. The previous checkpoint {other} ({round_}) is intact: to "
            f"resume from it, run `mv {shlex.quote(str(path))} {shlex.quote(str(aside))}` and "
            f"start the run again (the rounds after {round_} are trained again; metrics.jsonl "
            f"keeps both tries, the report shows the last). Or use a new out-dir"
        )

    def _load(self, path: Path, hint: bool = True) -> dict[str, Any]:
        import torch  # pylint: disable=import-outside-toplevel

        fallback = lambda: self.recovery_hint(path) if hint else "unusable"  # noqa: E731
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            raise CheckpointError(
                f"Corrupt or unreadable checkpoint {path} "
                f"({type(exc).__name__}: {exc}); {fallback()}"
            ) from exc
        if not isinstance(state, dict) or any(
            not isinstance(state.get(key), kind) for key, kind in _KEYS.items()
        ):
            raise CheckpointError(
                f"Checkpoint {path} lacks the keys {sorted(_KEYS)} "
                f"with the expected types; {fallback()}"
            )
        return state
