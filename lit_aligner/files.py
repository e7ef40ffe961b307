"""Files a user gives us and files we write for them: the one home of atomic writes, of reading JSON / JSONL row files
and JSON configs with errors that name the file, and of the user-error base class every script reports as one line.

Every file written for a user goes through `atomic_write` (a temporary file in the same folder, then a rename), so a
crash or a full disk never leaves a half-written file under the final name.
"""

import errno
import gzip
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

PathLike = Union[str, Path]


class UserError(ValueError):
    """Bad input from a user (a file, a flag, a row): the message names the file or flag and the fix. Scripts print
    it as one `error:` line (`lit_aligner.cli`). A ValueError, so library callers can catch either."""


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> Path:
    """`write(tmp_path)` into a temporary file next to `path`, then rename it onto `path`: a crash never leaves a half
    file under the final name. The file gets the usual permissions (0666 minus the umask), not mkstemp's 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _unwritable(path, e) from None
    os.close(fd)
    try:
        write(tmp)
        _publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":  # safetensors' own I/O error
            raise _unwritable(path, e) from None
        raise
    return path


def _unwritable(path: Path, e: BaseException) -> UserError:
    """A file that cannot be written (a full disk, a read-only folder) as one line naming it, not the traceback of
    whichever library was writing."""
    reason = getattr(e, "strerror", None) or str(e)
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in reason
    fix = "free some space there, or write it elsewhere" if full else "check that the folder is writable and has room"
    return UserError(f"{path}: cannot write it ({reason}); {fix}. Nothing was written under that name.")


def _publish(tmp: str, path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: PathLike, value: Any) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    import torch

    def save(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk, too) as a RuntimeError
            raise OSError(errno.EIO, f"torch.save failed: {str(e).splitlines()[0][:200]}") from None

    return atomic_write(path, save)


# ---------------------------------------------------------------------------------------------------------------------
# Reading


def read_text(path: PathLike, what: str = "file", error: Type[Exception] = UserError) -> str:
    """The UTF-8 text of `path` (a `.gz` file is decompressed). `error` (naming the file and what was expected) when it
    is missing, a directory, or not UTF-8 text."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path} is a directory, not a {what}; give the file itself.")
    if not path.is_file():
        raise error(f"{path}: no such file (expected a {what}).")
    try:
        if path.suffix == ".gz":  # the HH-RLHF release ships its splits gzipped
            try:
                with gzip.open(path, "rb") as f:
                    data = f.read()
            except (OSError, EOFError) as e:  # not gzip at all (BadGzipFile), or cut short (EOFError)
                raise error(f"{path}: not a whole gzip file ({e or 'it ends early'}): download it again, or give the "
                            f"uncompressed {what}.") from None
            return data.decode("utf-8-sig")
        return path.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError, EOFError):
        raise error(f"{path}: not a UTF-8 text file (a binary file?); expected a {what}.") from None


def read_json(path: PathLike, what: str = "JSON file", error: Type[Exception] = UserError) -> Any:
    """A JSON value from `path`; `error` naming the file (and the parse position) otherwise."""
    path = Path(path)
    try:
        return json.loads(read_text(path, what, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); fix or replace the {what}.") from None


def read_json_object(path: PathLike, what: str = "JSON file", error: Type[Exception] = UserError) -> Dict[str, Any]:
    value = read_json(path, what, error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object in this {what}, found a {type(value).__name__}.")
    return value


class BadRecord(Exception):
    """A JSONL line that is not valid JSON: kept as a record, so that callers can count it as a bad row."""


Records = List[Tuple[str, Any]]


def read_records(path: PathLike, what: str = "data file", error: Type[Exception] = UserError) -> Tuple[Records, str]:
    """The rows of a JSON list, JSONL (.gz) or parquet file as (where, value) pairs, where = "row i" (index in the list)
    or "line n" (1-based), and the container ("json" | "jsonl" | "parquet"). A JSONL line that is not valid JSON
    becomes a `BadRecord` value (the caller decides whether a bad row stops it); anything that is not a JSON list or
    JSONL raises `error`."""
    path = Path(path)
    if path.suffix == ".parquet" and path.is_file():  # the Hub's datasets are often only in parquet
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise error(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow (or the [data] "
                        f"extra).") from None
        try:
            return [(f"row {i}", v) for i, v in enumerate(pq.read_table(path).to_pylist())], "parquet"
        except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError types
            raise error(f"{path}: not a readable parquet file ({type(e).__name__}: {str(e)[:200]}).") from None
    text = read_text(path, what, error)
    stripped = text.lstrip()
    if not stripped:
        raise error(f"{path}: the file is empty; expected a JSON list or JSONL {what}.")
    if stripped[0] == "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{path}: not valid JSON ({e}); fix the file (a JSON list is expected).") from None
        return [(f"row {i}", v) for i, v in enumerate(value)], "json"
    if stripped[0] not in "{\"":
        raise error(f"{path}: not JSON or JSONL (it starts with {stripped[:20]!r}); expected a JSON list or one JSON "
                    f"value per line.")
    try:  # one JSON object spread over several lines: not a list of rows
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict) and text.strip().count("\n") > 0:
        raise error(f"{path}: a single JSON object, not a list of rows; expected a JSON list or JSONL (one value per "
                    f"line).")
    records: Records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((f"line {n}", BadRecord(f"is not valid JSON ({e.msg} at column {e.colno})")))
    return records, "jsonl"


# ---------------------------------------------------------------------------------------------------------------------
# Outputs a user names (--out FILE)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def input_files(*paths: Optional[PathLike]) -> List[Path]:
    """The files behind the given input paths (a directory stands for every file in it), for `check_output`."""
    out: List[Path] = []
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def check_output(out: PathLike, inputs: Sequence[PathLike] = (), force: bool = False, flag: str = "--out") -> Path:
    """Refuse, before any work, an output file that is one of the inputs, a directory, in an unwritable folder, or
    already there without --force. Returns the path."""
    out = Path(out)
    for i in inputs:
        if _same_file(out, Path(i)):
            raise UserError(f"{flag} {out} is one of this command's inputs ({i}); writing it would destroy that "
                            f"input. Choose another {flag}.")
    if out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give a file name.")
    parent = next((p for p in [out.parent, *out.parent.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {out}: {parent} is not writable; choose another {flag}.")
    if out.exists() and not force:
        raise UserError(f"{flag} {out} already exists; pass --force to replace it (it is replaced only once the new "
                        f"one is complete).")
    return out


@contextmanager
def atomic_output(path: PathLike, mode: str = "w") -> Iterator[IO]:
    """An open temporary file next to `path` (rows can stream into it) that replaces `path` only when the block ends
    without an error; on an error the temporary file is removed and an existing `path` stays untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_load_failure(e: Exception) -> str:
    """Why `torch.load(weights_only=True)` refused a file, in a few words and without torch's own advice to retry with
    weights_only=False (which would run code from the file): "it holds pickled Python objects (X), not plain tensors"
    or "it cannot be read (...)"."""
    text = str(e)
    if "Unsupported global" in text:
        obj = text.split("Unsupported global:", 1)[1].split(" was not")[0].replace("GLOBAL", "").strip()
        return f"it holds pickled Python objects ({obj[:80]}), not plain tensors"
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n\n")[0].strip()
        return f"it is not a file of plain tensors ({detail[:120]})"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(e).__name__
    return f"it cannot be read ({type(e).__name__}: {first})"
