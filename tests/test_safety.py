"""No lost work, no tracebacks: every output is checked before work starts and replaced only when complete, one run per
run directory, no NaN Aligner or run state, and one `error:` line (file and fix) for every bad input a user can give.
Each test here failed on the code before these guards (issue "No lost work, no tracebacks")."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import helpers

from lit_aligner import training as T
from lit_aligner.aligner_files import load_aligner, save_aligner
from lit_aligner.base import load_config
from lit_aligner.data import DataOptions
from lit_aligner.model import Aligner, AlignerConfig
from lit_aligner.training.state import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=300, env=None):
    return helpers.run_script(*args, timeout=timeout, env={"OMP_NUM_THREADS": "1", **(env or {})})


def one_error_line(r, *parts):
    """The process failed with exactly one `error:` line (notes and warnings may precede it) holding every part."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for part in parts:
        assert str(part) in errors[0], (part, errors[0])
    return errors[0]


def train_cfg(ckpt, out, **train_kw):
    kw = dict(max_steps=4, learning_rate=0.3, global_batch_size=8, micro_batch_size=8, warmup_steps=1,
              eval_interval=100, eval_iters=1, save_interval=2, seed=7)
    kw.update(train_kw)
    return T.SFTRunConfig(checkpoint_dir=ckpt, out_dir=out, n_tokens=2, start_layer=1,
                          data_options=DataOptions(max_seq_length=128), accelerator="cpu", progress=False,
                          compare=False, train=T.TrainConfig(**kw))


def train_cli(ckpt, out, *extra):
    return run_script("finetune/aligner.py", "--checkpoint-dir", ckpt, "--out-dir", out, "--max-steps", "2",
                      "--global-batch-size", "8", "--micro-batch-size", "8", "--n-tokens", "2", "--start-layer", "1",
                      "--max-seq-length", "128", "--eval-iters", "1", "--no-progress", "--accelerator", "cpu",
                      "--compare", "False", *extra)


@pytest.fixture
def tiny_copy(tiny_checkpoint_dir, tmp_path):
    """A writable copy of the tiny checkpoint, for tests that damage one of its files."""
    d = tmp_path / "tiny-copy"
    shutil.copytree(tiny_checkpoint_dir, d)
    return d


@pytest.fixture(scope="module")
def zero_aligner(tiny_checkpoint_dir, tmp_path_factory):
    config = load_config(tiny_checkpoint_dir)
    path = tmp_path_factory.mktemp("aligner") / "zero.safetensors"
    return save_aligner(Aligner(config, AlignerConfig(2, 1)), path, config.name, {"template": "plain"})


# ---------------------------------------------------------------------------------------------------------------------
# 1. generate --out


def generate_cli(ckpt, *args):
    return run_script("generate/aligner.py", "--checkpoint-dir", ckpt, "--prompt", "Say hi.", "--max-new-tokens",
                      "3", *args)


def test_generate_out_that_is_an_input_is_refused_and_the_input_is_untouched(tiny_checkpoint_dir, zero_aligner):
    before = zero_aligner.read_bytes()
    r = generate_cli(tiny_checkpoint_dir, "--aligner", zero_aligner, "--out", zero_aligner, "--force")
    one_error_line(r, "is one of this command's inputs", zero_aligner.name)
    assert zero_aligner.read_bytes() == before
    weights = tiny_checkpoint_dir / "model.safetensors"
    size = weights.stat().st_size
    r = generate_cli(tiny_checkpoint_dir, "--no-aligner", "--out", weights, "--force")
    one_error_line(r, "is one of this command's inputs")
    assert weights.stat().st_size == size


def test_generate_out_is_replaced_only_with_force_and_only_on_success(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text("precious\n")
    one_error_line(generate_cli(tiny_checkpoint_dir, "--no-aligner", "--out", out), "already exists", "--force")
    r = generate_cli(tiny_checkpoint_dir, "--no-aligner", "--out", out, "--force", "--max-new-tokens", "0")
    one_error_line(r, "--max-new-tokens")
    assert out.read_text() == "precious\n"  # a failed run leaves the old file as it was
    r = generate_cli(tiny_checkpoint_dir, "--no-aligner", "--out", out, "--force")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["prompt"] == "Say hi."
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


# ---------------------------------------------------------------------------------------------------------------------
# 2-3. One run per run directory; no silent overwrite


def test_a_second_run_into_a_locked_out_dir_stops_at_once(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    with RunLock(out):
        r = train_cli(tiny_checkpoint_dir, out)
        one_error_line(r, "is in use by another run", f"pid {os.getpid()}")
        assert not (out / "metrics.csv").exists()
    assert not (out / LOCK_NAME).exists()  # released when the holder exits


def test_a_stale_lock_of_a_dead_run_is_reported_and_taken_over(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 4000000 on a-machine-that-crashed\n")  # no process holds its flock
    r = train_cli(tiny_checkpoint_dir, out)
    assert r.returncode == 0, r.stderr
    assert "took over the stale lock" in r.stdout + r.stderr and "4000000" in r.stdout + r.stderr
    assert (out / "aligner.safetensors").is_file() and not (out / LOCK_NAME).exists()


def test_an_out_dir_holding_a_run_needs_resume_or_force(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    T.train(train_cfg(tiny_checkpoint_dir, out, max_steps=4))
    assert (out / "state" / "step-000004.pt").is_file()
    with pytest.raises(T.TrainError, match="already holds a run.*--resume auto.*--force"):
        T.train(train_cfg(tiny_checkpoint_dir, out, max_steps=2))
    cfg = train_cfg(tiny_checkpoint_dir, out, max_steps=2)
    cfg.force = True
    summary = T.train(cfg)
    assert summary["step"] == 2
    assert sorted(p.name for p in (out / "state").iterdir()) == ["last.pt", "step-000002.pt"]  # the old run's gone
    assert [r.split(",")[0] for r in (out / "metrics.csv").read_text().splitlines()[1:]] != []


def test_an_out_dir_that_is_a_file_is_refused_before_the_model_loads(tiny_checkpoint_dir, tmp_path):
    bad = tmp_path / "a-file"
    bad.write_text("not a directory")
    one_error_line(train_cli(tiny_checkpoint_dir, bad), "is a file")
    assert bad.read_text() == "not a directory"


def test_an_out_dir_that_is_a_base_model_directory_is_refused(tiny_copy):
    before = sorted(p.name for p in tiny_copy.iterdir())
    one_error_line(train_cli(tiny_copy, tiny_copy), "is a base model's directory", "another --out-dir")
    assert sorted(p.name for p in tiny_copy.iterdir()) == before  # no state/, metrics.csv or .lock among its files


def test_an_input_among_the_out_dirs_run_files_is_refused_even_with_force(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    assert train_cli(tiny_checkpoint_dir, out).returncode == 0
    aligner = out / "aligner.safetensors"
    before = aligner.read_bytes()
    # --force clears the run's files before the new run reads its inputs: this one would be gone, then overwritten
    r = train_cli(tiny_checkpoint_dir, out, "--init-aligner", aligner, "--force")
    one_error_line(r, "--init-aligner", "is the run's own aligner.safetensors", "Copy it out of")
    assert aligner.read_bytes() == before and (out / "state" / "last.pt").is_file()
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi."}) + "\n")
    kept = out / "state" / "rows.jsonl"
    shutil.copy(rows, kept)
    one_error_line(train_cli(tiny_checkpoint_dir, out, "--data", kept, "--force"), "--data", "is inside")
    assert kept.is_file() and aligner.read_bytes() == before
    copy = tmp_path / "start.safetensors"  # the way out the message gives
    shutil.copy(aligner, copy)
    r = train_cli(tiny_checkpoint_dir, out, "--init-aligner", copy, "--force")
    assert r.returncode == 0, r.stderr[-2000:]
    assert aligner.read_bytes() != before  # trained on from the copy, into the same directory


@pytest.mark.parametrize("script, flag", [("finetune/aligner.py", "--data"), ("finetune/aligner.py", "--val-data"),
                                          ("finetune/aligner.py", "--init-aligner"),
                                          ("finetune/aligner_dpo.py", "--reference-aligner")])
def test_a_missing_input_file_is_refused_before_any_data_loads(tiny_checkpoint_dir, tmp_path, script, flag):
    missing = tmp_path / "no-such-file.jsonl"
    r = run_script(script, "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "o", flag, missing,
                   "--max-steps", "1", "--no-progress", "--accelerator", "cpu")
    one_error_line(r, flag, missing, "no such file")
    assert "data from" not in r.stdout and not (tmp_path / "o").exists()  # before the data report and the out dir


# ---------------------------------------------------------------------------------------------------------------------
# 4-6. NaN guards, resume


def assert_finite_states(out):
    for f in (out / "state").glob("*.pt"):
        state = torch.load(f, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["aligner"].values()), f


def test_a_diverging_sft_run_stops_at_that_step_and_writes_nothing_non_finite(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "nan"
    r = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", out,
                   "--learning-rate", "1e30", "--max-steps", "6", "--save-interval", "1", "--global-batch-size", "8",
                   "--micro-batch-size", "8", "--n-tokens", "2", "--start-layer", "1", "--max-seq-length", "128",
                   "--eval-iters", "1", "--no-progress", "--accelerator", "cpu", "--compare", "False")
    line = one_error_line(r, "is not finite", "--learning-rate")
    assert "step " in line
    assert not (out / "aligner.safetensors").exists()
    assert_finite_states(out)


def test_a_diverging_dpo_run_stops_naming_the_real_flag(tiny_checkpoint_dir, tmp_path):
    from lit_aligner.data.default import generate_preference_rows

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
                             + "\n" for r in generate_preference_rows(40, seed=1)))
    out = tmp_path / "dpo"
    r = run_script("finetune/aligner_dpo.py", "--checkpoint-dir", tiny_checkpoint_dir, "--data", pairs,
                   "--out-dir", out, "--learning-rate", "1e30", "--max-steps", "6", "--save-interval", "1",
                   "--n-tokens", "2", "--start-layer", "1", "--max-seq-length", "128", "--eval-iters", "1",
                   "--no-progress", "--accelerator", "cpu")
    line = one_error_line(r, "is not finite", "--learning-rate")
    assert "--lr " not in line
    assert not (out / "aligner.safetensors").exists()
    assert_finite_states(out)


def test_generate_refuses_a_nan_aligner_in_one_line(tiny_checkpoint_dir, tmp_path):
    config = load_config(tiny_checkpoint_dir)
    a = Aligner(config, AlignerConfig(2, 1))
    with torch.no_grad():
        a.prefix.fill_(float("nan"))
    path = save_aligner(a, tmp_path / "nan.safetensors", config.name)
    one_error_line(generate_cli(tiny_checkpoint_dir, "--aligner", path), "nan.safetensors", "NaN")


def test_resume_auto_with_no_readable_state_says_so_and_force_starts_over(tiny_checkpoint_dir, tmp_path):
    straight = T.train(train_cfg(tiny_checkpoint_dir, tmp_path / "a", max_steps=4))
    out = tmp_path / "b"
    T.train(train_cfg(tiny_checkpoint_dir, out, max_steps=2))
    # a crash while the newest state was copied to another disk, say: both copies of step 2 are cut short
    for name in ("last.pt", "step-000002.pt"):
        (out / "state" / name).write_bytes((out / "state" / name).read_bytes()[:200])
    shutil.copy(out / "state" / "step-000002.pt", out / "state" / "step-000003.pt")  # an even newer damaged one
    cfg = train_cfg(tiny_checkpoint_dir, out, max_steps=4)
    cfg.resume = "auto"
    with pytest.raises(T.TrainError, match="holds a run .* but no readable run state to resume; pass --force"):
        T.train(cfg)
    cfg.force = True  # start over
    summary = T.train(cfg)
    assert summary["step"] == 4
    a, _ = load_aligner(straight["aligner"])
    b, _ = load_aligner(summary["aligner"])
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)


def test_resume_auto_falls_back_to_the_newest_readable_state(tiny_checkpoint_dir, tmp_path, capsys):
    straight = T.train(train_cfg(tiny_checkpoint_dir, tmp_path / "a", max_steps=4))
    out = tmp_path / "b"
    T.train(train_cfg(tiny_checkpoint_dir, out, max_steps=4))
    for name in ("last.pt", "step-000004.pt"):  # the newest state is damaged; step 2 is fine
        (out / "state" / name).write_bytes(b"\x00" * 10)
    (out / "aligner.safetensors").unlink()
    cfg = train_cfg(tiny_checkpoint_dir, out, max_steps=4)
    cfg.resume = "auto"
    summary = T.train(cfg)
    printed = capsys.readouterr().out
    assert "skipped an unreadable run state" in printed and "resuming from" in printed and "step-000002.pt" in printed
    a, _ = load_aligner(straight["aligner"])
    b, _ = load_aligner(summary["aligner"])
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)


@pytest.mark.slow
def test_kill_9_then_resume_auto_gives_the_uninterrupted_result(tiny_checkpoint_dir, tmp_path):
    args = ["--global-batch-size", "8", "--micro-batch-size", "4", "--n-tokens", "2", "--start-layer", "1",
            "--max-seq-length", "128", "--eval-interval", "100", "--eval-iters", "1", "--save-interval", "2",
            "--no-progress", "--accelerator", "cpu", "--compare", "False", "--max-steps", "12",
            "--learning-rate", "0.3"]
    run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "a", *args)
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "finetune/aligner.py", "--checkpoint-dir", str(tiny_checkpoint_dir),
                             "--out-dir", str(out), *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "state" / "step-000004.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    proc.wait()
    assert not (out / "aligner.safetensors").exists()
    r = run_script("finetune/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", out, *args,
                   "--resume")  # bare: auto
    assert r.returncode == 0, r.stderr
    a, _ = load_aligner(tmp_path / "a" / "aligner.safetensors")
    b, _ = load_aligner(out / "aligner.safetensors")
    assert torch.equal(a.prefix, b.prefix) and torch.equal(a.gate, b.gate)
    full, resumed = ((d / "metrics.csv").read_text().splitlines() for d in (tmp_path / "a", out))
    col = full[0].split(",").index("train_loss")
    assert [r.split(",")[col] for r in resumed[1:]] == [r.split(",")[col] for r in full[1:]]


def test_resume_with_other_flags_is_refused_unless_forced(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    T.train(train_cfg(tiny_checkpoint_dir, out, max_steps=2))
    cfg = train_cfg(tiny_checkpoint_dir, out, max_steps=4, learning_rate=0.1)
    cfg.resume, cfg.template = "auto", "alpaca"
    with pytest.raises(T.TrainError, match=r"--template None \(now alpaca\).*--learning-rate 0.3 \(now 0.1\).*--force"):
        T.train(cfg)
    cfg.force = True
    assert T.train(cfg)["step"] == 4


def test_an_unsafe_run_state_is_refused_without_suggesting_to_run_its_code(tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)
    torch.save({"version": 2, "aligner": {}, "payload": Path("x")}, out / "state" / "last.pt")  # a pickled object
    r = train_cli(tiny_checkpoint_dir, out, "--resume", str(out / "state" / "last.pt"))
    line = one_error_line(r, "last.pt", "pickled Python objects", "not plain tensors")
    assert "weights_only=False" not in r.stderr and len(line) < 400


# ---------------------------------------------------------------------------------------------------------------------
# Bad inputs: one line each


def test_max_seq_length_beyond_the_base_context_is_refused_up_front(tiny_checkpoint_dir, tmp_path):
    r = train_cli(tiny_checkpoint_dir, tmp_path / "o", "--max-seq-length", "100000")
    one_error_line(r, "--max-seq-length 100000", "context", "512")


def test_rows_longer_than_max_seq_length_point_to_the_truncation_flag_that_exists(tiny_checkpoint_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat: " + "word " * 200, "output": "ok " * 50}) + "\n"
                            for _ in range(10)))
    r = train_cli(tiny_checkpoint_dir, tmp_path / "o", "--data", data, "--max-seq-length", "64")
    one_error_line(r, "long.jsonl", "--truncation truncate")
    r = train_cli(tiny_checkpoint_dir, tmp_path / "o2", "--data", data, "--max-seq-length", "64", "--truncation",
                  "truncate")
    assert r.returncode == 1 and "no training rows left" in r.stderr  # prompts alone exceed 64 tokens: dropped
    r = train_cli(tiny_checkpoint_dir, tmp_path / "o3", "--data", data, "--max-seq-length", "300", "--truncation",
                  "truncate")
    assert r.returncode == 0, r.stderr
    assert "truncated=10" in r.stdout


def test_a_tokenizer_larger_than_the_embedding_is_refused(tiny_copy, tmp_path):
    config = json.loads((tiny_copy / "config.json").read_text())
    config["vocab_size"] = 100
    (tiny_copy / "config.json").write_text(json.dumps(config))
    (tiny_copy / "model.safetensors").unlink()  # the check comes before the weights are read
    one_error_line(train_cli(tiny_copy, tmp_path / "o"), str(tiny_copy), "tokenizer has", "embedding only 100")


CHAT_TEMPLATE_FAILURES = {
    "sandbox": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "syntax": "{% for m in messages %}{{ m.content }",
    "undefined": "{{ messages[0].content }}{{ not_defined.field }}",
    "not a string": ["oops"],
}


@pytest.mark.parametrize("case", list(CHAT_TEMPLATE_FAILURES))
def test_a_broken_chat_template_is_one_line_naming_tokenizer_config(tiny_copy, tmp_path, case):
    cfg_path = tiny_copy / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE_FAILURES[case]
    cfg_path.write_text(json.dumps(tok_cfg))
    one_error_line(train_cli(tiny_copy, tmp_path / "o", "--template", "chat"), "tokenizer_config.json")
    r = run_script("generate/base.py", "--checkpoint-dir", tiny_copy, "--prompt", "hi", "--max-new-tokens", "2")
    one_error_line(r, "tokenizer_config.json")


def test_a_chat_template_that_refuses_conversations_is_reported_with_its_reason(tiny_copy, tmp_path):
    cfg_path = tiny_copy / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["chat_template"] = "{{ raise_exception('only system prompts, please') }}"
    cfg_path.write_text(json.dumps(tok_cfg))
    one_error_line(train_cli(tiny_copy, tmp_path / "o", "--template", "chat"), "tokenizer_config.json",
                   "refused this conversation: only system prompts, please")


@pytest.mark.parametrize("damage", ["empty tokenizer.json", "broken tokenizer.json", "broken tokenizer_config.json",
                                    "non-integer config field"])
def test_damaged_model_files_are_one_line_naming_the_file(tiny_copy, tmp_path, damage):
    if damage == "empty tokenizer.json":
        name = "tokenizer.json"
        (tiny_copy / name).write_text("")
    elif damage == "broken tokenizer.json":
        name = "tokenizer.json"
        (tiny_copy / name).write_text('{"model": {"type": "BPE", "vocab": ')
    elif damage == "broken tokenizer_config.json":
        name = "tokenizer_config.json"
        (tiny_copy / name).write_text('{"bos_token": "<s>",')
    else:
        name = "config.json"
        config = json.loads((tiny_copy / name).read_text())
        config["n_layer"] = "four"
        (tiny_copy / name).write_text(json.dumps(config))
    one_error_line(train_cli(tiny_copy, tmp_path / "o"), tiny_copy / name)
    one_error_line(run_script("generate/base.py", "--checkpoint-dir", tiny_copy, "--max-new-tokens", "2"),
                   tiny_copy / name)


def test_bad_prompts_files_and_sampling_flags_are_one_line(tiny_checkpoint_dir, tmp_path):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    one_error_line(run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner",
                              "--prompts-file", latin1), "prompts.txt", "UTF-8")
    one_error_line(run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner",
                              "--prompts-file", tmp_path), "is a directory")
    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")):
        r = run_script("generate/aligner.py", "--checkpoint-dir", tiny_checkpoint_dir, "--no-aligner", "--prompt",
                       "hi", flag, value)
        one_error_line(r, f"{flag} must be")


def test_a_pickle_in_a_checkpoint_to_convert_is_one_line(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 16}))
    torch.save({"model.embed_tokens.weight": torch.zeros(32, 8), "evil": Path("/")}, src / "pytorch_model.bin")
    r = run_script("scripts/convert_hf.py", src, "--out-dir", tmp_path / "out")
    one_error_line(r, "pytorch_model.bin", "pickled Python objects")
    assert "weights_only=False" not in r.stderr and len(r.stderr.strip().splitlines()) == 2  # "converting ..." + error


def test_bad_rows_are_counted_in_the_summary_and_the_aligner_metadata(tiny_checkpoint_dir, tmp_path):
    from lit_aligner.data.default import generate_rows

    rows = [json.dumps(r) for r in generate_rows(60, seed=2)] + ['{"instruction": "no output"}', "{broken"]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = train_cfg(tiny_checkpoint_dir, tmp_path / "run", max_steps=1)
    cfg.data = data
    summary = T.train(cfg)
    assert summary["data"]["bad_rows"] == 2 and summary["data"]["rows_read"] == 62
    _, meta = load_aligner(summary["aligner"])
    assert json.loads(meta["data"])["bad_rows"] == 2


@pytest.mark.parametrize("script, args, parts", [
    ("finetune/aligner.py", ["--prefix-init", "xyz"],
     ["--prefix-init", "'hidden'", "python finetune/aligner.py --help"]),
    ("finetune/aligner.py", ["--no-compare"], ["--no-compare", "Perhaps you meant --compare"]),
    ("evaluate/aligner.py", [], ["Missing subcommand", "loss, inspect, preference"]),
    ("generate/aligner.py", ["--max-new-tokens", "abc"], ["--max-new-tokens", "'abc'"]),
    # a nested config's own check (DPOLossConfig): our message alone, not tyro's "Value error: Error parsing dpo:"
    ("finetune/aligner_dpo.py", ["--beta", "-1"], ["error: --beta must be > 0, got -1.0."]),
    ("finetune/aligner_kto.py", ["--desirable-weight", "0"], ["error: --desirable-weight and --undesirable-weight"]),
])
def test_a_bad_command_line_is_one_error_line_not_a_box(script, args, parts):
    r = run_script(script, *args)
    assert r.returncode == 2 and "╭" not in r.stderr and "│" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    helped = run_script(script, "--help")
    assert helped.returncode == 0 and "usage:" in helped.stdout


WRITE_EVERY_WAY = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from lit_aligner.files import UserError, atomic_torch_save, atomic_write, atomic_write_text

out, big = Path(sys.argv[1]), torch.zeros(100_000)
for name, write in [("a.safetensors", lambda p: atomic_write(p, lambda tmp: save_file({"x": big}, tmp))),
                    ("state.pt", lambda p: atomic_torch_save({"x": big}, p)),
                    ("meta.json", lambda p: atomic_write_text(p, "x" * 100_000))]:
    try:
        write(out / name)
        print(name, "written")
    except UserError as e:
        print(e)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_fails_is_one_line_naming_the_file_and_leaves_nothing(tmp_path):
    """Real writes by safetensors, torch.save and Python that fail (here: a file-size limit, as a full disk fails them)
    are one UserError naming the file and the fix, never the writing library's traceback, and leave no file behind."""
    import resource
    import signal

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    r = subprocess.run([sys.executable, "-c", WRITE_EVERY_WAY, str(tmp_path)], cwd=helpers.ROOT, capture_output=True,
                       text=True, preexec_fn=small_files, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    for line, name in zip(lines, ["a.safetensors", "state.pt", "meta.json"]):
        assert line.startswith(f"{tmp_path / name}: cannot write it (") and "Nothing was written" in line, line
    assert list(tmp_path.iterdir()) == []  # no file under the name, no temporary file
