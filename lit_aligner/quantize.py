"""A quantized frozen base (`--quantize`): the QLoRA recipe for Aligners. Every linear layer of the transformer blocks
keeps its weight in 4 or 8 bits through bitsandbytes (NF4 / FP4 blocks of 64 with an absmax each, `-dq` quantizing
those absmaxes too; or LLM.int8 with outliers above 6 kept in 16 bits), on the GPU and on the CPU alike. The
embedding, the norms and the LM head stay in the model's dtype (as transformers' bitsandbytes integration keeps
`lm_head`), and so does the Aligner: its prefix goes through the quantized K/V projections, its gradient through the
quantized layers, and the base's weights never change.

An Aligner is a few kilobytes next to the base, so the base is the memory: NF4 stores it in about 0.56 byte per
number (bf16: 2), which is what lets a 13B or 70B base train an Aligner on one GPU."""

import logging
from typing import Annotated, Dict, Literal, Optional, Union

import torch
import tyro
from torch import nn

from lit_aligner.files import UserError

# flag value -> (bitsandbytes layer kind, its quant type, double quantization of the absmaxes)
MODES: Dict[str, tuple] = {
    "bnb.nf4": ("4bit", "nf4", False),
    "bnb.nf4-dq": ("4bit", "nf4", True),
    "bnb.fp4": ("4bit", "fp4", False),
    "bnb.fp4-dq": ("4bit", "fp4", True),
    "bnb.int8": ("8bit", None, False),
}
QuantizeName = Literal[("none", *MODES)]  # the flag's choices, from MODES (one list)
QUANTIZE_HELP = ("hold the base's block weights in 4 or 8 bits (bitsandbytes; pip install -e '.[quantize]'): "
                 "bnb.nf4 (QLoRA's), bnb.nf4-dq (its absmaxes quantized too), bnb.fp4, bnb.fp4-dq, bnb.int8 "
                 "(LLM.int8); the Aligner stays in full precision (howto/performance.md).")
# The `--quantize` flag of every command that loads a base (one help text, one default).
QuantizeFlag = Annotated[QuantizeName, tyro.conf.arg(help=QUANTIZE_HELP)]


class QuantizeError(UserError):
    """A --quantize value or combination that cannot run; the message names the fix."""


# Two bitsandbytes log warnings that say nothing to act on: at import on CPUs with AVX512-BF16 when the optional
# `kernels` package (a faster CPU 4-bit matmul from the Hugging Face Hub) is missing (its own kernel is used, the one
# tested here), and at every LLM.int8 call whose input is not fp16 (it computes in fp16 by design).
_QUIET = {"bitsandbytes.backends.cpu.ops": "kernels-community",
          "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast"}


class _Quiet(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def import_bitsandbytes():
    for name, text in _QUIET.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet(text))
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizeError("--quantize needs bitsandbytes: pip install -e '.[quantize]' (or pip install "
                            "bitsandbytes)") from None
    return bitsandbytes


def check_mode(mode: Optional[str]) -> Optional[str]:
    """The flag's value as a mode (None for "none"), or a QuantizeError naming the choices."""
    if mode in (None, "none"):
        return None
    if mode not in MODES:
        raise QuantizeError(f"--quantize must be one of none, {', '.join(MODES)}; got {mode!r}")
    return mode


def quantized_linear(linear: nn.Linear, mode: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes layer holding `linear`'s weight quantized on `device` (the float weight is not kept)."""
    bnb = import_bitsandbytes()
    kind, quant_type, double = MODES[mode]
    bias = linear.bias is not None
    if kind == "4bit":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              compress_statistics=double, quant_type=quant_type, device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                     compress_statistics=double, quant_type=quant_type, module=q)
        # On CPUs with AVX512-BF16, bitsandbytes repacks a layer's weight for its bf16 kernel at the first no-grad
        # eval-mode call, and from then on computes it without autograd: a validation pass would silently stop the
        # prefix's gradient for the rest of training. One kernel for every pass instead.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(linear.weight.data.to(compute_dtype), requires_grad=False,
                                     has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    q.weight = q.weight.to(device)  # bitsandbytes quantizes on this move
    return q


def quantize_blocks(model: nn.Module, mode: str, device: Union[str, torch.device], dtype: torch.dtype) -> None:
    """Replace every nn.Linear of `model.layers` by its quantized layer on `device`, one at a time (the float weights
    of one layer at most are on the device besides the quantized ones), and move the rest of the base there in
    `dtype` (an attached Aligner stays as it is). Sets `model.quantize` to the mode."""
    from lit_aligner.model import is_aligner_param

    mode = check_mode(mode)
    device = torch.device(device)
    for block in model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, quantized_linear(child, mode, device, dtype))
    for name, p in list(model.named_parameters()):  # the rest of the base: embedding, norms, LM head
        if type(p) is nn.Parameter and not is_aligner_param(name) and (p.device != device or p.dtype != dtype):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Parameter(p.data.to(device, dtype), requires_grad=False))
    model.quantize = mode


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all the model's weights as held: the quantized layers' (`quantized_bytes`) and every other parameter."""
    plain = sum(p.numel() * p.element_size() for p in model.parameters() if type(p) is nn.Parameter)
    return plain + quantized_bytes(model)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the quantized layers' weights take in memory: the packed numbers and their statistics (4-bit: absmaxes
    and code book, and with -dq the absmaxes' own; int8: a scale per row)."""
    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if w is None or type(w) is nn.Parameter:
            continue
        total += nbytes(w) + nbytes(getattr(w, "SCB", None))
        state = getattr(w, "quant_state", None)
        while state is not None:  # a -dq state nests the absmaxes' own state
            total += nbytes(state.absmax) + nbytes(state.code) + nbytes(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total
