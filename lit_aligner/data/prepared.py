"""Prepared data on disk (what scripts/prepare_*.py write and every trainer reads as `--data DIR`): train.safetensors
and val.safetensors (flat int32 tokens + int64 offsets per field, see `TokenizedDataset.tensors`) and meta.json (kind,
template, tokenizer fingerprint, max_seq_length, counts, split seed). Written atomically, meta.json last."""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from lit_aligner.data.dataset import KINDS, TokenizedDataset
from lit_aligner.data.formats import DataError
from lit_aligner.files import atomic_write, atomic_write_json, read_json_object

META_NAME = "meta.json"
SPLITS = ("train", "val")
# 1: SFT rows stored as one sequence + prompt_lengths; 2: no SFT context (one answer per row); both still read
DATA_VERSION = 3


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of how the tokenizer encodes a probe text (+ its special ids): prepared data only fits the same."""
    probe = "Hello, world! 12345 \u00fcn\u00efc\u00f6d\u00e9 \n\tThe quick brown fox.\n\n### Response: ASSISTANT:"
    ids = tokenizer.encode(probe).tolist()
    key = json.dumps([ids, tokenizer.bos_id, tokenizer.eos_id, getattr(tokenizer, "vocab_size", None)])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def storable_info(info: Dict[str, Any]) -> Dict[str, Any]:
    """A loader's counts without the bad-row examples (row texts): what goes into saved metadata."""
    return {k: v for k, v in info.items() if k != "bad_row_examples"}


def save_prepared(out_dir: Union[str, Path], train: TokenizedDataset, val: TokenizedDataset, info: Dict[str, Any],
                  tokenizer=None) -> Path:
    """Write `train`, `val` and meta.json into out_dir (each file atomically; meta.json last, so a directory with a
    meta.json is complete)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    for name, ds in zip(SPLITS, (train, val)):
        tensors = {k: v.contiguous() for k, v in ds.tensors().items()}
        atomic_write(out_dir / f"{name}.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {"version": DATA_VERSION, **storable_info(info), "kind": train.kind}
    if tokenizer is not None:
        meta["tokenizer"] = {"checkpoint_dir": str(getattr(tokenizer, "checkpoint_dir", "")),
                             "fingerprint": tokenizer_fingerprint(tokenizer),
                             "vocab_size": getattr(tokenizer, "vocab_size", None),
                             "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
    atomic_write_json(out_dir / META_NAME, meta)
    return out_dir


def is_prepared(path: Union[str, Path, None]) -> bool:
    return isinstance(path, (str, Path)) and Path(path).is_dir()


def load_prepared(data_dir: Union[str, Path], kind: Optional[str] = None,
                  tokenizer=None) -> Tuple[TokenizedDataset, TokenizedDataset, Dict[str, Any]]:
    """Read a directory written by `save_prepared`. Checks the kind and (given a tokenizer) that the data was
    tokenized by the same tokenizer. Returns (train, val, meta)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    data_dir = Path(data_dir)
    meta_path = data_dir / META_NAME
    if not meta_path.is_file():
        raise DataError(f"{data_dir}: not a prepared data directory (no {META_NAME}); make one with "
                        f"scripts/prepare_*.py or pass a .json/.jsonl file.")
    meta = read_json_object(meta_path, "prepared-data meta.json", DataError)
    if isinstance(meta.get("version"), int) and meta["version"] > DATA_VERSION:
        raise DataError(f"{data_dir} was prepared by a newer lit-aligner (data version {meta['version']}; this one "
                        f"reads up to {DATA_VERSION}); upgrade lit-aligner or prepare the data again.")
    stored_kind = meta.get("kind")
    if stored_kind not in KINDS:
        raise DataError(f"{meta_path}: unknown data kind {stored_kind!r}; prepare the data again.")
    if kind is not None and stored_kind != kind:
        source = meta.get("source") or "ROWS.jsonl"
        command = "scripts/prepare_default.py" if source == "default" else \
            f"scripts/prepare_json.py --data-file {source}"
        raise DataError(f"{data_dir} holds {stored_kind} data, but {kind} data is needed: prepare its rows as {kind} "
                        f"data (`python {command} --kind {kind}`, howto/data.md) or give the raw rows as --data.")
    if tokenizer is not None and "tokenizer" in meta and \
            meta["tokenizer"].get("fingerprint") != tokenizer_fingerprint(tokenizer):
        raise DataError(f"{data_dir} was tokenized with another tokenizer ({meta['tokenizer'].get('checkpoint_dir')}) "
                        f"than this model's ({getattr(tokenizer, 'checkpoint_dir', '?')}); prepare the data again "
                        f"with --checkpoint-dir pointing at this model.")
    splits = []
    for name in SPLITS:
        f = data_dir / f"{name}.safetensors"
        try:
            splits.append(TokenizedDataset.from_tensors(stored_kind, load_file(str(f))))
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise DataError(f"{f}: missing or unreadable ({e}); prepare the data again.") from None
    return splits[0], splits[1], meta
