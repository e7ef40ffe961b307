"""The streaming writer: every safetensors header is computed up front by running the name mapping over meta-device
stand-ins (`plan`), then each tensor's bytes are written in turn, so converting a 7B model holds about one layer's
q/k/v in memory, not the model. Files are written under temporary names and renamed at the end: a crash never leaves a
half file under a final name."""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from lit_aligner.base import INDEX_NAME, WEIGHTS_NAME
from lit_aligner.convert.sources import _ST_DTYPES

PathLike = Union[str, Path]
Shape = Tuple[int, ...]
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's default shard size ("5GB")
OnTensor = Callable[[int, int, str], None]  # (index, count, our tensor name): progress of the write pass


@dataclass
class TensorSpec:
    name: str
    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def safetensors_header(specs: Sequence[TensorSpec], metadata: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes before the data of a safetensors file holding `specs` back to back, in order: an 8-byte little-endian
    header length, then the JSON header padded with spaces to a multiple of 8 bytes (aligned tensor data)."""
    header: Dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for s in specs:
        if s.dtype not in _ST_DTYPES:
            raise ValueError(f"{s.name}: dtype {s.dtype} has no safetensors code")
        header[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def shard_specs(specs: Sequence[TensorSpec], max_shard_bytes: int) -> List[List[TensorSpec]]:
    """Split `specs`, in order, into runs of at most `max_shard_bytes` (a tensor larger than that gets its own)."""
    shards: List[List[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_weights(out_dir: PathLike, specs: Sequence[TensorSpec], tensors: Iterable[Tuple[str, torch.Tensor]],
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, on_tensor: Optional[OnTensor] = None) -> List[Path]:
    """Stream `tensors` (name, tensor), arriving in the order of `specs`, into `model.safetensors`, or into
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when they exceed `max_shard_bytes`.
    Each tensor is written as it arrives and then dropped. All files appear under their final names only once every
    byte is written; stale weight files of an earlier conversion in `out_dir` are removed. Returns the files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = shard_specs(specs, max_shard_bytes)
    n = len(shards)
    finals = [out_dir / WEIGHTS_NAME] if n == 1 else \
        [out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    temps = [_tmp_name(f) for f in finals]
    it = iter(tensors)
    done = 0
    try:
        for shard, tmp in zip(shards, temps):
            with open(tmp, "wb") as f:
                f.write(safetensors_header(shard))
                for spec in shard:
                    try:
                        name, t = next(it)
                    except StopIteration:
                        raise ValueError(f"the tensors ended before {spec.name}") from None
                    if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                        raise ValueError(f"expected {spec.name} {spec.shape} {spec.dtype}, got {name} "
                                         f"{tuple(t.shape)} {t.dtype}")
                    # Raw bytes of a contiguous tensor (little-endian, as safetensors stores them), no extra copy.
                    f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())
                    done += 1
                    if on_tensor is not None:
                        on_tensor(done, len(specs), name)
                    del t
        extra = next(it, None)
        if extra is not None:
            raise ValueError(f"unexpected extra tensor {extra[0]}")
        index = None
        if n > 1:
            weight_map = {s.name: final.name for shard, final in zip(shards, finals) for s in shard}
            index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
            temps.append(_tmp_name(out_dir / INDEX_NAME))
            temps[-1].write_text(json.dumps(index, indent=2) + "\n")
            finals.append(out_dir / INDEX_NAME)
        _remove_stale_weights(out_dir, keep=set(finals))
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return finals


def _remove_stale_weights(out_dir: Path, keep: set) -> None:
    stale = [out_dir / WEIGHTS_NAME, out_dir / INDEX_NAME, *out_dir.glob("model-*-of-*.safetensors")]
    for f in stale:
        if f not in keep and f.is_file():
            f.unlink()
