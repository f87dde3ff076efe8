"""Checkpoints: atomic saves, ``weights_only`` loads, RNG state that survives both, and compatibility checks.

A checkpoint is a plain dict (model / optimizer / scheduler state dicts, epoch, step, samples_seen, best metric,
the run's args, RNG states). Everything in it must be a type ``torch.load(weights_only=True)`` accepts: tensors,
dicts, lists, tuples, str, int, float, bool, None. ``save_checkpoint`` refuses anything else before the old file
is touched, so a run never writes a checkpoint it cannot resume from.

Paths: local paths are written to a temporary file in the same directory and renamed over the target with
``os.replace`` (atomic on POSIX and Windows), so a crash mid-save leaves the previous checkpoint intact. Other
fsspec URLs (``gs://...``) are serialized in memory and uploaded in one write; object stores publish an object only
when its upload completes, which gives the same all-or-nothing guarantee.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from pipeline.errors import Yt8mError

# The flags that fix parameter shapes; a checkpoint trained with other values cannot be loaded into the model.
DEFAULT_COMPATIBILITY_KEYS = ("head", "backbone", "features", "num_classes", "feature_dim")


# mkstemp creates 0600 files; a checkpoint should get the permissions any other file the user writes gets.
_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(Yt8mError):
    """A checkpoint is missing, unreadable, holds non-plain objects, or does not fit the requested model."""


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path)


def to_plain(value: Any) -> Any:
    """Recursively convert values to types ``weights_only`` loading accepts: Paths -> str, tuples/sets -> lists,
    numpy scalars/arrays -> Python numbers/lists, Namespaces -> dicts. Used for the run's args."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in value]
    if hasattr(value, "__dict__") and not isinstance(value, torch.Tensor):
        return to_plain(vars(value))
    raise CheckpointError(f"cannot store a {type(value).__name__} ({value!r}) as a plain checkpoint value")


def previous_path(path: str | os.PathLike) -> str:
    """Where ``save_checkpoint(keep_previous=True)`` keeps the checkpoint it replaced: ``last.pt`` -> ``last.prev.pt``."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.prev{ext or '.pt'}"


def save_checkpoint(path: str | os.PathLike, state: dict, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` all-or-nothing (see the module docstring). Raises ``CheckpointError`` when
    ``state`` holds objects that ``load_checkpoint`` would refuse; the old file is then left as it was.

    ``keep_previous``: the file being replaced moves to ``previous_path(path)`` first (local paths), so a
    checkpoint damaged on disk later still leaves one good one for ``load_latest_checkpoint``."""
    if not isinstance(state, dict):
        raise CheckpointError(f"a checkpoint state must be a dict, got {type(state).__name__}")
    path = os.fspath(path)
    if not _is_local(path):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        _check_weights_only_safe(buffer, path)
        import fsspec
        with fsspec.open(path, "wb") as f:
            f.write(buffer.getbuffer())
        return
    target = _local_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        _check_weights_only_safe(tmp, path)
        if keep_previous and target.exists():
            os.replace(target, previous_path(target))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _check_weights_only_safe(written: io.BytesIO | str, path: str) -> None:
    if isinstance(written, io.BytesIO):
        written.seek(0)
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        # Reads only the pickle stream, not the tensor data: cheap even for large checkpoints.
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(written)
    else:  # torch < 2.5: a full trial load is the only check
        try:
            torch.load(written, map_location="cpu", weights_only=True)
            unsafe = []
        except pickle.UnpicklingError as e:
            unsafe = [str(e).strip().splitlines()[0]]
    if unsafe:
        raise CheckpointError(f"not saving {path}: the state holds objects torch.load(weights_only=True) refuses "
                              f"({', '.join(sorted(unsafe))}); convert them to str/int/float/list/dict/tensor "
                              f"(model.engine.checkpoint.to_plain does this for args)")


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required_keys: Iterable[str] = ()) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary code runs from the file).
    Raises ``CheckpointError`` when the file is missing, corrupt, not a dict, or lacks any of ``required_keys``."""
    path = os.fspath(path)
    try:
        if _is_local(path):
            local = _local_path(path)
            if not local.is_file():
                raise CheckpointError(f"no checkpoint at {path}")
            state = torch.load(local, map_location=map_location, weights_only=True)
            with open(local, "rb") as f:
                _verify_archive(f, path)
        else:
            import fsspec
            try:
                with fsspec.open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                raise CheckpointError(f"no checkpoint at {path}") from None
            except Exception as e:  # the store, not the file: never call an unreachable checkpoint corrupt
                from pipeline.storage import storage_cause

                cause = storage_cause(e)
                if cause is None:
                    raise
                raise CheckpointError(f"cannot read checkpoint {path}: {cause}") from None
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
            _verify_archive(io.BytesIO(data), path)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first:  # torch's advice (with terminal colour codes) is not ours to give
            why = " ".join(str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].split(" Please use")[0].split())
            raise CheckpointError(f"cannot read checkpoint {path} (corrupt, or not a weights_only checkpoint): the "
                                  f"weights-only unpickler refused it ({why or 'unsupported content'}); it is never "
                                  f"unpickled any other way, since that could run code from the file") from None
        raise CheckpointError(f"cannot read checkpoint {path} (corrupt, truncated or not a weights_only "
                              f"checkpoint): {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    missing = [k for k in required_keys if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(map(str, state)))})")
    return state


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written to a temp name then renamed: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_epoch(out: Path, state: dict, metrics: dict, is_best: bool) -> None:
    """A training loop's end-of-epoch files: ``metrics.json``, ``best.pt`` (when ``is_best``), then ``last.pt``
    (keeping the one it replaces as ``last.prev.pt``). ``last.pt`` goes last: a kill before it leaves the previous
    epoch's, and ``--resume`` drops the metrics of epochs past the checkpoint it loads, so no epoch is lost or
    counted twice."""
    write_json(out / "metrics.json", metrics)
    if is_best:
        save_checkpoint(out / "best.pt", state)
    save_checkpoint(out / "last.pt", state, keep_previous=True)


def _verify_archive(f, path: str) -> None:
    """``CheckpointError`` naming the file when a record of the checkpoint's zip archive fails its CRC-32:
    ``torch.load`` does not check them, so a flipped byte inside a tensor would load as a silently different
    weight. Torch's legacy (pre-1.6, non-zip) format has no checksums to check."""
    if not zipfile.is_zipfile(f):
        return
    f.seek(0)
    with zipfile.ZipFile(f) as z:
        bad = z.testzip()
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its record {bad} fails its CRC-32 check")


def load_latest_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[dict, str]:
    """(state, the file it came from): ``path``, or, when that is missing, truncated or corrupt, the previous
    checkpoint ``save_checkpoint(keep_previous=True)`` kept, with one line on stderr naming the bad file and why.
    ``CheckpointError`` naming both files when neither loads."""
    import sys

    try:
        return load_checkpoint(path, map_location), os.fspath(path)
    except CheckpointError as first:
        prev = previous_path(path)
        if not (_is_local(prev) and _local_path(prev).is_file()):
            raise
        try:
            state = load_checkpoint(prev, map_location)
        except CheckpointError as second:
            raise CheckpointError(f"{first}; and the previous one: {second}") from None
        print(f"warning: {first}; resuming from the previous checkpoint {prev} (epoch {state.get('epoch')})",
              file=sys.stderr)
        return state, prev


def check_compatible(ckpt_args: Mapping[str, Any], expected: Mapping[str, Any],
                     keys: Iterable[str] = DEFAULT_COMPATIBILITY_KEYS) -> None:
    """Raise ``CheckpointError`` listing every ``key`` on which the checkpoint's args and ``expected`` disagree
    (e.g. resuming a CMA-SNet run with ``--head mean``). Values compare after ``to_plain``, so a tuple in the
    live args equals the list stored in the checkpoint."""
    if not isinstance(ckpt_args, Mapping):
        raise CheckpointError(f"checkpoint args are a {type(ckpt_args).__name__}, not a dict of flags")
    mismatches = []
    for key in keys:
        stored = to_plain(ckpt_args[key]) if key in ckpt_args else "<absent>"
        wanted = to_plain(expected[key]) if key in expected else "<absent>"
        if stored != wanted:
            flag = "--" + key.replace("_", "-")
            mismatches.append(f"{flag} {stored} in the checkpoint vs {wanted} now")
    if mismatches:
        raise CheckpointError("checkpoint does not match this run: " + "; ".join(mismatches))


def capture_rng_state() -> dict:
    """Torch (CPU and every CUDA device), NumPy (legacy global) and Python ``random`` states as tensors, lists
    and numbers only, so they pass ``weights_only`` loading; ``restore_rng_state`` puts them back."""
    np_state = np.random.get_state(legacy=True)  # ('MT19937', keys uint32 (624,), pos, has_gauss, cached_gaussian)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. A CUDA state from a machine with another device count (or without CUDA)
    cannot be applied; that is reported with a warning and the CPU generators are still restored."""
    try:
        torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
        n = state["numpy"]
        np.random.set_state((n["bit_generator"], n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["cached_gaussian"])))
        p = state["python"]
        random.setstate((int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss_next"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint RNG state is malformed: {type(e).__name__}: {e}") from None
    cuda = state.get("cuda")
    if cuda is None:
        return
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
    else:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        warnings.warn(f"checkpoint has RNG states for {len(cuda)} CUDA device(s), this machine has {have}: "
                      f"CUDA random streams are not restored", RuntimeWarning, stacklevel=2)
