"""What both benchmarks share: the device and precision flags, building a random-weight model on the target device,
machine information, the results table and the JSON file. Library helpers live in `lit_aligner.perf`; this module
only holds what is specific to benchmark scripts (it is imported as `benchmarks.common` or, when a script runs as a
file, as `common` from its own folder)."""

import json
import os
import platform
import re
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
# SimPO's settings in the benchmarks, ours and TRL's CPOTrainer alike (beta: the SimPO paper's range is 2 to 2.5; gamma:
# TRL's default); a step's speed does not depend on them
SIMPO_BETA, SIMPO_GAMMA = 2.0, 0.5
if str(REPO) not in sys.path:  # run as `python benchmarks/train.py` from anywhere
    sys.path.insert(0, str(REPO))

from lit_aligner.config import Config  # noqa: E402
from lit_aligner.devices import default_precision, precision_dtype, resolve_device  # noqa: E402
from lit_aligner.files import UserError, atomic_write_json, check_output, input_files  # noqa: E402
from lit_aligner.model import Aligner, AlignerConfig, LLaMA, init_weights, mark_only_aligner_as_trainable  # noqa: E402
from lit_aligner.perf import apply_activation_checkpointing, compile_blocks, random_items  # noqa: E402


@contextmanager
def sigterm_as_interrupt():
    """SIGTERM to a benchmark (`kill`, `timeout`, a scheduler's time limit) ends it as Ctrl-C does, so what it started
    is stopped too (a system's training child, a server) instead of outliving it, its temporary files go, and the
    results file keeps the finished runs."""
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)  # (Python's SIGINT handler: KeyboardInterrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class BenchmarkError(UserError):
    """Bad flags (unknown config, precision the device cannot run, ...) or out of memory: `lit_aligner.cli.run_cli`
    prints it as one `error: ...` line and exits 1."""


@contextmanager
def out_of_memory_hint(fix: str):
    """Turn an out-of-memory error of the block into a BenchmarkError that says what to lower."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise BenchmarkError(f"out of memory ({str(e).splitlines()[0]}): {fix}") from None


def require(*modules: str, extra: str, or_flag: Optional[str] = None) -> None:
    """A BenchmarkError naming the first missing module, the extra that installs it and, if given, the flag that does
    without it."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            alternative = f" (or {or_flag})" if or_flag else ""
            raise BenchmarkError(f"this benchmark needs {name}: pip install -e '.[{extra}]'{alternative}") from None


def pick_device(device: str) -> torch.device:
    return resolve_device(device)


def pick_dtype(precision: Optional[str], device: torch.device) -> torch.dtype:
    """None: bf16-true on CUDA, 32-true on the CPU (bf16 matmuls are slow on CPUs without AMX)."""
    return precision_dtype(precision or default_precision(device.type))


def load_config(name: str) -> Config:
    try:
        return Config.from_name(name)
    except ValueError as e:
        raise BenchmarkError(f"--config: {e}") from None


def build_model(config: Config, device: torch.device, dtype: torch.dtype, n_tokens: Optional[int] = None,
                start_layer: int = 2, seed: int = 0) -> LLaMA:
    """A model with random weights (`init_weights`: speed does not depend on the values) built directly on `device` in
    `dtype`, so a 7B model never exists in fp32 or on the CPU. With n_tokens, an Aligner (kept in fp32 like an
    optimiser's master weights; it is cast where it enters the base) is attached and made the only trainable part,
    with non-zero gates so the prefix path does real work."""
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            aligner_config = AlignerConfig(n_tokens, start_layer) if n_tokens else None
            model = LLaMA(config, aligner_config)
    finally:
        torch.set_default_dtype(prev)
    model.reset_rope(device)  # the RoPE tables are computed in fp32 on the device
    with torch.no_grad():
        init_weights(model)
        if model.aligner is not None:
            model.aligner.float()
            model.aligner.gate.normal_(std=0.02)
    mark_only_aligner_as_trainable(model)
    return model


def build_peer_model(config: Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The same shape as a Hugging Face transformers model (`Config.to_hf_config`), random weights, built directly on
    `device` in `dtype`: the model a user of the peer (transformers, PEFT) would run."""
    import transformers

    hf_config = {k: v for k, v in config.to_hf_config().items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_config),
                                                             dtype=dtype)


def peer_versions(trl: bool = False) -> Dict[str, str]:
    import peft
    import transformers

    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    if trl:
        import trl as trl_module

        versions["trl"] = trl_module.__version__
    return versions


def _peft():
    import warnings

    import peft

    # PEFT 0.21 reads an attribute transformers 5 deprecated: one FutureWarning per run, neither ours nor the user's
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # and PEFT's prefix tuning passes `past_key_values`, which transformers 5.24 deprecated: the same
    warnings.filterwarnings("ignore", message="`past_key_values` is deprecated")
    return peft


def peer_lora_config(rank: int = 8):
    """PEFT LoRA on q and v, alpha = 2 x rank, no dropout: r=8 is the LoRA of the paper's comparison."""
    return _peft().LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                              target_modules=["q_proj", "v_proj"])


def peer_prefix_tuning_config(n_tokens: int = 10):
    """PEFT prefix tuning with `n_tokens` virtual tokens (a learned key and value per token and layer)."""
    return _peft().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_tokens)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, into: List[float]):
    """Append the wall-clock seconds of the block (the GPU synchronised on entry and exit) to `into`."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    into.append(time.perf_counter() - t0)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return float("nan") if n == 0 else (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    """This process's command line, shell-quoted: what reruns a figure."""
    return " ".join(shlex.quote(a) for a in sys.argv)


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the figures depend on: accelerator or CPU model and cores, load average, torch version, command line."""
    info: Dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "command": command_line(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15min"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count())
    return info


def machine_name(device: torch.device) -> str:
    """A short file-name tag: the GPU name (e.g. "nvidia-h100-80gb-hbm3") or "cpu<cores>"."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu{os.cpu_count()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_out(kind: str, tag: str, device: torch.device) -> Path:
    return REPO / "benchmarks" / "results" / f"{kind}-{tag}-{machine_name(device)}.json"


def check_out(path: Path, force: bool, inputs: Sequence[Any] = ()) -> Path:
    """The results file, refused before the benchmark runs when it exists (unless --force) or is one of `inputs`."""
    return check_output(path, input_files(*inputs), force)


def partial_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def write_json(path: Path, payload: Dict[str, Any]) -> Path:
    """The finished results (atomically); the rows-so-far file of `write_partial` goes."""
    written = atomic_write_json(path, json.loads(json.dumps(payload, default=str)))
    partial_path(path).unlink(missing_ok=True)
    return written


def write_partial(path: Path, payload: Dict[str, Any]) -> Path:
    """The rows so far, next to the results file (<name>.partial.json, "complete": false): a run stopped midway (a time
    limit, an out-of-memory error) keeps them, and an existing results file stays untouched until the run completes."""
    return atomic_write_json(partial_path(path), json.loads(json.dumps(payload, default=str)))


def format_table(rows: List[Dict[str, Any]], columns: Sequence[str], formats: Optional[Dict[str, str]] = None) -> str:
    """A plain-text table of `rows` (dicts) with the given column keys; floats get 3 significant decimals unless
    `formats` gives a column its own format spec (e.g. losses: ".4f")."""

    def fmt(v: Any, spec: Optional[str]) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            if spec:
                return format(v, spec)
            return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return "-" if v is None else str(v)

    formats = formats or {}
    cells = [[fmt(r.get(c), formats.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def random_aligner(model: LLaMA, n_tokens: int, start_layer: int, seed: int) -> Aligner:
    """A random inference Aligner (N(0, 1) prefix, small non-zero gates) on the model's device."""
    g = torch.Generator().manual_seed(seed)
    a = Aligner(model.config, AlignerConfig(n_tokens, start_layer))
    with torch.no_grad():
        a.prefix.copy_(torch.randn(a.prefix.shape, generator=g))
        a.gate.copy_(0.02 * torch.randn(a.gate.shape, generator=g))
    return a.to(model.tok_embeddings.weight.device).requires_grad_(False)


def training_step(model: LLaMA, mode: str, policy: str, batch: int, seq_len: int, chunk_size: int,
                  device: torch.device, compiled: bool, num_generations: int = 4) -> Callable[[], torch.Tensor]:
    """One optimizer step of `mode`'s objective (the library's own SFT, DPO, whose reference is the bare base through
    the same weights, SimPO: DPO's objective under a loss with no reference pass, or KTO on `batch` labelled
    completions, its mismatched rows from the same batch, on-policy distillation: `distill_step`, or GRPO: `grpo_step`)
    on a fixed batch of `batch` random rows, under checkpointing `policy`: call it, get the loss (per response token for
    SFT and distillation, per pair for DPO and SimPO, per completion for KTO, per answer for GRPO, as the trainer
    averages it)."""
    from lit_aligner.training import DPOLossConfig
    from lit_aligner.training.objectives import get_objective

    apply_activation_checkpointing(model, policy)
    if compiled:  # after the policy, so that the checkpointed forward is what gets compiled
        torch._dynamo.reset()
        compile_blocks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if mode == "distill":
        return distill_step(model, batch, seq_len, chunk_size, device, optimizer)
    if mode == "grpo":
        return grpo_step(model, batch, seq_len, chunk_size, device, optimizer, num_generations)
    if mode == "simpo":
        objective = get_objective("dpo")(pad_id=0, chunk_size=chunk_size, config=DPOLossConfig(
            loss=("simpo",), beta=SIMPO_BETA, simpo_gamma=SIMPO_GAMMA))
    else:  # (KTO's default loss config: TRL's kto at beta 0.1, the bare base as reference)
        objective = get_objective(mode)(pad_id=0, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(0)
    items = random_items(objective.data_kind, model.config.vocab_size, batch, seq_len, g)
    batch_t = {k: v.to(device) for k, v in objective.collate(items).items()}
    units = sum(objective.units(item) for item in items)  # the objective returns sums
    return lambda: optimizer_step(objective(model, batch_t)["loss"] / units, optimizer)


def optimizer_step(loss: torch.Tensor, optimizer) -> torch.Tensor:
    """Backward of `loss`, one optimizer step, gradients cleared; returns the loss."""
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def distill_rows(vocab_size: int, batch: int, seq_len: int) -> List[Dict[str, torch.Tensor]]:
    """On-policy distillation's rows: each a random prompt of seq_len / 4 tokens and a random context of as many (the
    teacher reads it in front of the prompt); the student writes the other 3/4 of its row."""
    q = seq_len // 4
    ids = torch.randint(0, vocab_size, (batch, 2 * q), generator=torch.Generator().manual_seed(0))
    return [{"prompt": r[q:], "context": r[:q]} for r in ids]


def distill_step(model: LLaMA, batch: int, seq_len: int, chunk_size: int, device: torch.device,
                 optimizer) -> Callable[[], torch.Tensor]:
    """One step of on-policy context distillation (`finetune/aligner_distill.py --lmbda 1`): the student (the base
    with the Aligner) samples seq_len - seq_len / 4 tokens after each prompt (no stop token, so every row is as long),
    then the teacher (the bare base reading the context in front of the prompt) and the student score them; the
    forward KL per sampled token, backward, AdamW."""
    from lit_aligner.training import DistillTrainConfig
    from lit_aligner.training.objectives import get_objective

    rows = distill_rows(model.config.vocab_size, batch, seq_len)
    q = seq_len // 4
    objective = get_objective("distill")(
        pad_id=0, chunk_size=chunk_size, config=DistillTrainConfig(lmbda=1.0, max_new_tokens=seq_len - q),
        max_seq_length=seq_len + q, stop_ids=(), seed=0)
    end = torch.tensor([model.config.vocab_size - 1])  # (a sample never stops, so it never ends with it)
    items = {i: {"prompt": r["prompt"], "response": end, "teacher_prompt": torch.cat([r["context"], r["prompt"]])}
             for i, r in enumerate(rows)}
    calls = [0]

    def step() -> torch.Tensor:
        rolled = objective.rollout(None, model, items, calls[0])
        calls[0] += 1
        batch_t = {k: v.to(device) for k, v in objective.collate(list(rolled.values()), 0).items()}
        units = sum(objective.units(it) for it in rolled.values())
        if units != batch * (seq_len - q):  # tokens/s counts whole rows
            raise RuntimeError(f"sampled {units} tokens, not {batch} x {seq_len - q}")
        return optimizer_step(objective(model, batch_t)["loss"] / units, optimizer)

    return step


def even_tokens(completions: Sequence[str], **kwargs: Any) -> List[float]:
    """The GRPO benchmark's reward function, ours and TRL's (both are given this one, by its file for ours): the share
    of a completion's tokens with an even id ("t4 t7" -> 0.5), as the benchmark's texts write ids; cheap, and it
    differs between the answers of a group as a real reward does, so no group is without signal."""
    return [sum(int(w[1:]) % 2 == 0 for w in c.split()) / max(len(c.split()), 1) for c in completions]


def grpo_step(model: LLaMA, batch: int, seq_len: int, chunk_size: int, device: torch.device, optimizer,
              num_generations: int) -> Callable[[], torch.Tensor]:
    """One step of GRPO (`finetune/aligner_grpo.py`'s objective): batch / num_generations random prompts of seq_len / 4
    tokens, each answered num_generations times by the student (the base with the Aligner; temperature 1, no stop
    before the last of seq_len - seq_len / 4 tokens, so every row is as long), the answers scored by `even_tokens`,
    advantages within each group, then the student's forward and backward on them (beta 0: no reference pass, TRL's
    default), AdamW."""
    from lit_aligner.training import GRPOConfig
    from lit_aligner.training.objectives import get_objective

    q = seq_len // 4
    config = GRPOConfig(rewards=[f"{Path(__file__).resolve()}:even_tokens"], num_generations=num_generations,
                        max_new_tokens=seq_len - q)
    objective = get_objective("grpo")(pad_id=0, decode=lambda ids: " ".join(f"t{i}" for i in ids), config=config,
                                      chunk_size=chunk_size, max_seq_length=seq_len, stop_ids=(), seed=0)
    vocab = model.config.vocab_size
    prompts = torch.randint(0, vocab, (batch // num_generations, q), generator=torch.Generator().manual_seed(0))
    end = torch.tensor([vocab - 1])  # (an answer never stops, so it never ends with it)
    items = {i: {"prompt": p, "response": end} for i, p in enumerate(prompts)}
    calls = [0]

    def step() -> torch.Tensor:
        answers = [a for group in objective.rollout(None, model, items, calls[0]).values() for a in group]
        calls[0] += 1
        step.reward = float(torch.cat([a["reward"] for a in answers]).mean())  # the row's, beside TRL's logged one
        if sum(len(a["response"]) for a in answers) != batch * (seq_len - q):  # tokens/s counts whole rows
            raise RuntimeError(f"sampled answers of {[len(a['response']) for a in answers]} tokens, not {batch} x "
                               f"{seq_len - q}")
        batch_t = {k: v.to(device) for k, v in objective.collate(answers).items()}
        return optimizer_step(objective(model, batch_t)["loss"] / len(answers), optimizer)

    return step
