"""Per-round checkpoints and a metrics log that survive a crash mid-write.

Flower persists nothing beyond run logs, so the ServerApp saves state itself.
`checkpoint.pt` is written to a temporary file and swapped in with
`os.replace`, so a reader sees either the old or the new file, never half of
one; the one it replaces is kept as `checkpoint.prev.pt`. Checkpoints hold only
tensors and plain Python types so they load with `torch.load(weights_only=True)`,
which cannot execute code from a tampered file.
"""

import json
import os
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path
from typing import Any

import numpy as np

from flwr.app import ArrayRecord
from flwr.common.logger import log

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
METRICS = "metrics.jsonl"
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
        tmp = self.out_dir / f"{CHECKPOINT}.tmp"
        try:
            with open(tmp, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            if self.checkpoint_path.exists():
                # Rotate first: the last finished round is never lost
                os.replace(self.checkpoint_path, self.previous_path)
            os.replace(tmp, self.checkpoint_path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.out_dir)
        self.append_metrics(
            {"round": int(server_round), "stage": str(stage), "metrics": metrics or {}}
        )
        return self.checkpoint_path

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        """Append one JSON object as a line of `metrics.jsonl` (e.g. per client)."""
        line = json.dumps(dict(record), sort_keys=True, default=_json_default)
        with open(self.metrics_path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All lines of `metrics.jsonl` (empty list if none were written)."""
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, encoding="utf-8") as file:
            return [json.loads(line) for line in file if line.strip()]

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

    def _load(self, path: Path) -> dict[str, Any]:
        import torch  # pylint: disable=import-outside-toplevel

        fallback = (
            f"the previous checkpoint {self.previous_path} is kept"
            if path != self.previous_path and self.previous_path.exists()
            else "no earlier checkpoint exists"
        )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pylint: disable=broad-exception-caught
            raise CheckpointError(
                f"Corrupt or unreadable checkpoint {path} "
                f"({type(exc).__name__}: {exc}); {fallback}"
            ) from exc
        if not isinstance(state, dict) or any(
            not isinstance(state.get(key), kind) for key, kind in _KEYS.items()
        ):
            raise CheckpointError(
                f"Checkpoint {path} lacks the keys {sorted(_KEYS)} "
                f"with the expected types; {fallback}"
            )
        return state
