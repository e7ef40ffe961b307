"""Fixture builders shared by several test files, and how they run the repository's commands (imported as `helpers`;
tests/ is on sys.path under pytest)."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Mistral's tool format, as Mistral 7B v0.3's chat template renders it (written here from the format, not copied): the
# tools before the last user turn, calls as one JSON list after [TOOL_CALLS] with 9-letter ids, results with the id.
MISTRAL_TOOLS = (
    "{{- bos_token }}{%- set last = namespace(i=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set last.i = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}"
    "{%- if tools and loop.index0 == last.i %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}"
    "{%- endif %}{{- '[INST] ' + m.content + '[/INST]' }}"
    "{%- elif m.tool_calls %}{{- '[TOOL_CALLS] [' }}{%- for c in m.tool_calls %}"
    "{%- if c.id is not defined or c.id | length != 9 %}{{- raise_exception('call ids are 9 letters or digits') }}"
    "{%- endif %}{{- {'name': c.function.name, 'arguments': c.function.arguments, 'id': c.id} | tojson }}"
    "{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ']' + eos_token }}"
    "{%- elif m.role == 'assistant' %}{{- ' ' + m.content + eos_token }}"
    "{%- elif m.role == 'tool' %}"
    "{{- '[TOOL_RESULTS] ' + {'content': m.content, 'call_id': m.tool_call_id} | tojson + '[/TOOL_RESULTS]' }}"
    "{%- endif %}{%- endfor %}")
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def templated_checkpoint(source: Path, dest: Path, chat_template: str) -> Path:
    """A checkpoint directory that is `source` (its files linked) with another chat template in its tokenizer config."""
    dest.mkdir()
    for f in source.iterdir():
        if f.name != "tokenizer_config.json":
            (dest / f.name).symlink_to(f.resolve())
    config = json.loads((source / "tokenizer_config.json").read_text())
    (dest / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": chat_template}))
    return dest


def bpe_tokenizer_dir(d: Path, corpus: Iterable[str], vocab_size: int, eos: str = "</s>", add_bos: bool = True,
                      extra_config: Optional[Dict] = None) -> Path:
    """Train a byte-level BPE (Hugging Face `tokenizers`) on `corpus` into d/tokenizer.json, with SPECIALS as special
    tokens and a tokenizer_config.json (bos <s>, the given eos, pad <pad>, a ChatML chat template). Returns d."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(corpus), trainer)
    tok.save(str(d / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": eos, "pad_token": "<pad>", "add_bos_token": add_bos,
              "chat_template": CHATML, **(extra_config or {})}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def sp_tokenizer_dir(d: Path, corpus: Iterable[str], vocab_size: int) -> Path:
    """Train a SentencePiece BPE model set up as LLaMA-2's (byte fallback, no normalisation: a line break is its byte
    piece, not a space; <pad> <s> </s> as ids 3 1 2, the chat markers user-defined) on `corpus` into
    d/tokenizer.model, with a tokenizer_config.json (a ChatML chat template). Returns d."""
    import io

    import sentencepiece as spm

    d.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=SPECIALS[3:],
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   pad_id=3, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHATML}))
    return d


# ---------------------------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks on local files: a multiple-choice task (loglikelihood) and a generation task

MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


def harness_tasks(d: Path):
    """tiny_mc (6 sums, 3 choices each) and tiny_gen (4 "Say X:" prompts) as task YAMLs + JSONL data in d, for
    `--include-path d`. Returns (d, mc rows, gen rows)."""
    mc = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), "blue"], "label": i % 3}
          for i, (a, b) in enumerate([(1, 2), (3, 4), (10, 5), (2, 2), (7, 1), (6, 6)])]
    gen = [{"question": f"Say {w}:", "answer": w} for w in ("yes", "no", "red", "blue")]
    (d / "mc.jsonl").write_text("\n".join(map(json.dumps, mc)) + "\n")
    (d / "gen.jsonl").write_text("\n".join(map(json.dumps, gen)) + "\n")
    (d / "tiny_mc.yaml").write_text(MC_YAML.format(data=d / "mc.jsonl"))
    (d / "tiny_gen.yaml").write_text(GEN_YAML.format(data=d / "gen.jsonl"))
    return d, mc, gen


# ---------------------------------------------------------------------------------------------------------------------
# Running the repository's commands

ROOT = Path(__file__).resolve().parent.parent


class _ForkServer:
    """The client of tests/forkserver.py: started on first use, one per test session (pytest runs tests serially)."""

    proc = None

    def run(self, argv, cwd, env, timeout):
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert json.loads(self.proc.stdout.readline()).get("ready"), "tests/forkserver.py did not start"
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": argv, "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err),
                       "timeout": timeout}
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            if "error" in reply:
                raise subprocess.TimeoutExpired(argv, timeout)
            return subprocess.CompletedProcess([sys.executable, *argv], reply["returncode"],
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))


_server = _ForkServer()


def run_script(*args, cwd=None, env=None, timeout: float = 300, fresh: bool = False,
               input: Optional[str] = None):
    """`python ARGS...` (a repository script and its flags) with cwd=the repository root, the test process's environment
    plus `env`, captured text output, as subprocess.run returns it. The command runs as a forked child of a process that
    has already imported torch and the library (tests/forkserver.py: ~2 s saved per command, the same script, argv,
    files and exit status); fresh=True starts a new interpreter instead, for what depends on the interpreter's own
    start (signals sent from outside, environment read at import). input: text on the command's stdin (a fresh
    interpreter: the forked children have none)."""
    argv = [str(a) for a in args]
    full_env = {**os.environ, **(env or {})}
    if fresh or input is not None or os.environ.get("LIT_ALIGNER_TESTS_NO_FORKSERVER"):
        return subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, env=full_env, capture_output=True, text=True,
                              timeout=timeout, input=input)
    return _server.run(argv, cwd or ROOT, full_env, timeout)


def assert_same_trained_aligner(a_dir: Path, b_dir: Path, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Two runs' Aligners (DIR/aligner.safetensors) are equal to float tolerance, and trained (their gates moved):
    how a multi-process run is checked against one process."""
    import torch

    from lit_aligner.aligner_files import load_aligner

    (a, _), (b, _) = (load_aligner(Path(d) / "aligner.safetensors") for d in (a_dir, b_dir))
    assert a.gate.abs().sum() > 0
    torch.testing.assert_close(a.prefix, b.prefix, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.gate, b.gate, rtol=rtol, atol=atol)


def why(p) -> str:
    """A failed command's stderr for an assertion message: from its first traceback or `error:` line (of several ranks,
    the one that failed first seldom prints last), and its end."""
    err = p.stderr
    first = min((i for i in (err.find("Traceback"), err.find("error:")) if i >= 0), default=len(err))
    return err[first:first + 3000] + ("\n[...]\n" + err[-3000:] if len(err) - first > 3000 else "")


def read_wandb_history(path: Path) -> Dict[int, Dict[str, float]]:
    """The logged rows (step -> {name: value}) of a Weights & Biases run file (OFFLINE_RUN/run-ID.wandb): a 7-byte
    ":W&B" header, then LevelDB's log format (32 KiB blocks of chunks: crc32 4 bytes, length 2, type 1 = whole record,
    2/3/4 = first/middle/last part) whose records are wandb's `Record` protobufs. Only for tests: a reader independent
    of the writer (wandb's own reader lives in its Go core)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, rows, pos, part = path.read_bytes(), {}, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            part = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return rows


def record_compile_steps(monkeypatch) -> list:
    """`perf.should_compile` replaced by one that records the decode_steps it is asked with and says no (eager): the
    list of them, for checking what a caller counts (on the CPU its answer would be no whatever the steps)."""
    from lit_aligner import perf

    seen = []
    monkeypatch.setattr(perf, "should_compile",
                        lambda device, compile=None, decode_steps=None: seen.append(decode_steps) or False)
    return seen


def load_script(path: str):
    """A script of the repository (e.g. "generate/aligner.py") as a module: the CLIs and benchmarks are scripts, not
    a package."""
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("script_" + path.replace("/", "_")[:-3], root / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module."""
    return load_script(f"benchmarks/{name}.py")


def greedy(model, prompt, max_new, stop, aligner=None):
    """Greedy continuation by whole forward passes (no cache, one row): the independent reference for rollouts."""
    import torch

    seq, out = prompt.clone(), []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(seq[None], aligner=aligner)[0, -1].argmax())
            if tok in stop:
                return out, True
            out.append(tok)
            seq = torch.cat([seq, torch.tensor([tok])])
    return out, False


def train_whole_and_resumed(monkeypatch, config, tmp_path: Path, at: int = 2):
    """`config(out)` (a run config writing to `out`) trained whole into tmp_path/"full", and into tmp_path/"cut"
    stopped by a SIGINT after step `at` (the step completes and its state is written) then resumed there: returns
    (the whole run's summary, the metrics rows of "full", of "cut")."""
    import functools
    import signal

    from lit_aligner.training import engine, train
    from lit_aligner.training import run as run_module
    from lit_aligner.training.plot import read_metrics

    full = train(config(tmp_path / "full"))

    def interrupt(step, row):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_module, "fit", functools.partial(engine.fit, on_step=interrupt))
    assert train(config(tmp_path / "cut"))["step"] == at + 1
    monkeypatch.setattr(run_module, "fit", engine.fit)
    train(dataclasses.replace(config(tmp_path / "cut"), resume="auto"))
    return full, *(read_metrics(tmp_path / d / "metrics.csv") for d in ("full", "cut"))


def run_one_and_two_processes(common, tmp_path: Path, timeout: float = 600) -> None:
    """The training command `common` run into tmp_path/"one" (one process) and tmp_path/"two" (two DDP processes, a
    torch thread each); both must succeed."""
    one = run_script(*common, "--out-dir", tmp_path / "one", timeout=timeout)
    assert one.returncode == 0, why(one)
    two = run_script(*common, "--out-dir", tmp_path / "two", "--devices", "2", "--strategy", "ddp",
                     env={"OMP_NUM_THREADS": "1"}, timeout=timeout)
    assert two.returncode == 0, why(two)
