"""Devices, dtypes and precisions: the one place that turns the `--device`, `--dtype` and `--precision` flags into
torch objects, with the same defaults everywhere (bf16 on a GPU, fp32 on the CPU)."""

from typing import Literal, Optional, Union

import torch

from lit_aligner.files import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]
# Fabric precision flags -> the weight dtype the model is loaded in ("-mixed" keeps fp32 weights).
PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16,
              "bf16-mixed": torch.float32, "16-mixed": torch.float32, "32": torch.float32}


def resolve_device(device: Union[str, torch.device] = "auto") -> torch.device:
    """"auto": CUDA when available, else the CPU. A CUDA device on a machine without CUDA is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    return d


def gpu_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> Optional[torch.dtype]:
    """A `--dtype` flag: "auto" is bfloat16 on CUDA (float16 where bf16 is unsupported) and, on the CPU, None (the
    checkpoint's own dtype); a name from DTYPES is that dtype."""
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype == "auto":
        return gpu_dtype() if torch.device(device).type == "cuda" else None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def default_precision(accelerator: str = "auto") -> str:
    """The training precision: bf16-true on a GPU that supports bf16 (16-true otherwise), 32-true on the CPU."""
    if accelerator in ("auto", "cuda", "gpu") and torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    """The weight dtype a Fabric precision flag implies (the model is loaded straight into it)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return PRECISIONS[precision]
