"""The Aligners a server can serve: the files in one directory (ADIR), found by name, loaded on first use, checked
against the loaded base and kept in an LRU cache.

A name is the file's path relative to ADIR without its suffix (`helpful.safetensors` -> `helpful`,
`paper/alpaca-7b.pth` -> `paper/alpaca-7b`); a training run directory's `aligner.safetensors` is named after the run
(`runs/sft1/aligner.safetensors` -> `runs/sft1`). Only names found by scanning ADIR resolve, so a request can never
name a path: `../x`, absolute paths and symlinks that lead out of ADIR are not in the listing. Hidden entries and
training state folders (`state/`, `checkpoints/`) are skipped. The directory is scanned again whenever a name is not
found, so files copied in after start are served without a restart, and a changed file (size or mtime) is reloaded.
"""

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from lit_aligner.aligner_files import PAPER_SUFFIXES, AlignerFileError, load_aligner
from lit_aligner.files import UserError
from lit_aligner.model import LLaMA
from lit_aligner.serving.engine import ServedAligner

SUFFIXES = (".safetensors",) + PAPER_SUFFIXES
SKIPPED_DIRS = {"state", "checkpoints"}  # a training run's resumable state (.pt files that are not Aligners)


class UnknownAligner(LookupError):
    """No Aligner of that name in ADIR (the server answers 404)."""


class BadAligner(ValueError):
    """The file of that name is not a valid Aligner for this base (the server answers 400 for that request only)."""


@dataclass
class Listed:
    name: str
    path: Path
    mtime: float
    size: int


class AlignerRegistry:
    def __init__(self, aligners_dir: Path, model: LLaMA, base_name: str, max_loaded: int = 64):
        self.root = Path(aligners_dir)
        if not self.root.is_dir():
            raise UserError(f"--aligners-dir {self.root}: no such directory; create it and put Aligner files "
                            f"(.safetensors, or the paper's .pth) in it")
        if max_loaded < 1:
            raise UserError(f"--max-loaded-aligners must be >= 1, got {max_loaded}")
        self.real_root = self.root.resolve()
        self.model, self.base_name, self.max_loaded = model, base_name, max_loaded
        self.loaded: "OrderedDict[str, Tuple[Listed, ServedAligner]]" = OrderedDict()
        self.lock = threading.Lock()
        self.loads = 0  # files read so far (hot-loads and reloads included)

    def scan(self) -> Dict[str, Listed]:
        """name -> file, for every Aligner-looking file inside ADIR (sorted by name)."""
        found: Dict[str, Listed] = {}
        for path in sorted(self.root.rglob("*")):
            rel = path.relative_to(self.root)
            if path.suffix not in SUFFIXES or any(p.startswith(".") for p in rel.parts) \
                    or any(p in SKIPPED_DIRS for p in rel.parts[:-1]):
                continue
            try:
                real = path.resolve()
                if not real.is_relative_to(self.real_root) or not real.is_file():
                    continue  # a symlink out of ADIR (or a dangling one) is not servable
                st = real.stat()
            except OSError:
                continue
            name = rel.with_suffix("").as_posix()
            if rel.name == "aligner.safetensors" and len(rel.parts) > 1:
                name = rel.parent.as_posix()
            if name == self.base_name or name in found:
                name = rel.as_posix()  # keep the full file name rather than shadow the base or another file
            found[name] = Listed(name, path, st.st_mtime, st.st_size)
        return found

    def names(self) -> List[str]:
        return list(self.scan())

    def get(self, name: str) -> ServedAligner:
        """The served form of Aligner `name` (loaded, checked and projected on first use). UnknownAligner when ADIR
        has no such name; BadAligner (one line naming the file and the fix) when its file is not a valid Aligner for
        this base. Thread-safe; called off the event loop (loading reads a file and projects the prefix)."""
        with self.lock:
            cached = self.loaded.get(name)
            if cached is not None:  # one stat, not a scan: a cached name is checked for change or removal only
                listed, served = cached
                try:
                    st = listed.path.stat()
                except OSError:
                    st = None
                if st is not None and (st.st_mtime, st.st_size) == (listed.mtime, listed.size):
                    self.loaded.move_to_end(name)
                    return served
                del self.loaded[name]
            listed = self.scan().get(name)
            if listed is None:
                raise UnknownAligner(name)
            served = self._load(listed)
            self.loaded[name] = (listed, served)
            while len(self.loaded) > self.max_loaded:
                self.loaded.popitem(last=False)
            return served

    def _load(self, listed: Listed) -> ServedAligner:
        self.loads += 1
        try:
            with warnings.catch_warnings(record=True) as caught:  # a same-shape base of another name still serves
                warnings.simplefilter("always")
                aligner, meta = load_aligner(listed.path, self.model, base_name=self.base_name)
        except (AlignerFileError, UserError, ValueError, OSError) as e:
            raise BadAligner(f"{listed.name}: {e}") from None
        for w in caught:
            print(f"warning: {w.message}", flush=True)
        return ServedAligner.project(self.model, listed.name, aligner, meta)
