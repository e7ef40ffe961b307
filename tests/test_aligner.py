"""Aligner files: our .safetensors format, compatibility with bases, the paper's .pth checkpoints, the CLI."""

import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import helpers
from lit_aligner.aligner_files import (AlignerBaseWarning, AlignerFileError, attach, check_compatible,
                                       export_paper_checkpoint, import_paper_checkpoint, load_aligner, save_aligner)
from lit_aligner.config import Config
from lit_aligner.model import LLaMA, Aligner, AlignerConfig, init_weights

ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = ROOT.parent / "shared" / "data" / "aligner-paper-weights"
# From ../shared/data/README.md: file -> (N, n_embd, n_head, start_layer, n_layer, base)
PAPER_FILES = {
    "alpaca-sft-llama2-7b-1token.pth": (1, 4096, 32, 2, 32, "Llama-2-7b-hf"),
    "alpaca-sft-llama2-13b-10tokens.pth": (10, 5120, 40, 2, 40, "Llama-2-13b-hf"),
    "beaver-dpo-llama2-7b-1token.pth": (1, 4096, 32, 2, 32, "Llama-2-7b-hf"),
}
NOT_A_CHECKPOINT = PAPER_DIR / "published-but-not-a-checkpoint.pth"
PAPER_PREFIX_KEY = "global_value_embedding.weight"
needs_shared = pytest.mark.skipif(not PAPER_DIR.is_dir(), reason="../shared/data/aligner-paper-weights is absent")


def random_aligner(config: Config, n_tokens: int = 3, start_layer: int = 2, dtype=torch.float32) -> Aligner:
    a = Aligner(config, AlignerConfig(n_tokens=n_tokens, start_layer=start_layer)).to(dtype)
    with torch.no_grad():
        a.gate.normal_()
    return a


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return helpers.run_script(ROOT / "scripts" / "convert_aligner.py", *args, timeout=120)


# ---------------------------------------------------------------------------------------------------------------
# Our format
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_keeps_tensors_dtype_and_metadata(tmp_path, dtype):
    config = Config.from_name("tiny")
    a = random_aligner(config, n_tokens=4, start_layer=1, dtype=dtype)
    path = save_aligner(a, tmp_path / "sub" / "a.safetensors", "tiny",
                        {"mode": "dpo", "template": "alpaca", "lr": 0.003, "steps": [1, 2]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.safetensors"]  # no temp file left behind
    b, meta = load_aligner(path)
    assert b.prefix.dtype == dtype and b.gate.dtype == dtype
    assert torch.equal(b.prefix, a.prefix) and torch.equal(b.gate, a.gate)
    assert (b.n_tokens, b.start_layer, b.n_layer, b.n_head, b.n_embd) == (4, 1, config.n_layer, config.n_head,
                                                                          config.n_embd)
    assert meta["format"] == "lit-aligner" and meta["format_version"] == "1" and meta["base_model"] == "tiny"
    assert (meta["mode"], meta["template"], meta["lr"], meta["steps"]) == ("dpo", "alpaca", "0.003", "[1, 2]")
    assert {k: meta[k] for k in ("n_tokens", "start_layer", "n_layer", "n_head", "n_embd")} == {
        "n_tokens": "4", "start_layer": "1", "n_layer": str(config.n_layer), "n_head": str(config.n_head),
        "n_embd": str(config.n_embd)}
    c, _ = load_aligner(path, dtype=torch.float64)
    assert c.prefix.dtype == torch.float64
    with torch.device("meta"):
        model = LLaMA(config)
    d, _ = load_aligner(path, model)  # onto a base: its device and dtype
    assert d.prefix.device.type == "meta" and d.prefix.dtype == model.tok_embeddings.weight.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama2_7b_one_token_file_is_under_32_kb(tmp_path, dtype):
    a = random_aligner(Config.from_name("Llama-2-7b-hf"), n_tokens=1, dtype=dtype)
    path = save_aligner(a, tmp_path / "a.safetensors", "Llama-2-7b-hf")
    assert path.stat().st_size < 32 * 1024
    assert load_aligner(path)[0].num_params() == 5056


def test_loaded_aligner_steers_a_model_like_the_original(tmp_path):
    config = Config.from_name("tiny")
    torch.manual_seed(0)
    model = LLaMA(config).eval()
    init_weights(model, std=0.1)
    a = random_aligner(config)
    path = save_aligner(a, tmp_path / "a.safetensors", "tiny")
    idx = torch.randint(0, config.vocab_size, (2, 6))
    with torch.no_grad():
        expected = model(idx, aligner=a)
        attach(model, path)
        assert torch.equal(model(idx), expected)
        assert not torch.equal(model(idx), model(idx, aligner=False))


def test_shape_mismatch_error_names_both_shapes_and_both_files(tmp_path):
    a = random_aligner(Config.from_name("Llama-2-7b-hf"), n_tokens=1)
    path = save_aligner(a, tmp_path / "alpaca-7b.safetensors", "Llama-2-7b-hf")
    _, meta = load_aligner(path)
    base = Config.from_name("Llama-2-13b-hf")
    for what in (meta, a):
        with pytest.raises(AlignerFileError) as e:
            check_compatible(what, base, path, "checkpoints/Llama-2-13b-hf")
        msg = str(e.value)
        for part in ("alpaca-7b.safetensors", "checkpoints/Llama-2-13b-hf", "(1, 4096)", "(30, 32)", "(38, 40)",
                     "n_embd=4096", "n_embd=5120"):
            assert part in msg, (part, msg)


def test_attach_to_a_model_of_another_shape_fails_clearly(tmp_path):
    small = Config.from_name("tiny")
    other = Config(name="tiny-wide", n_layer=small.n_layer, n_head=small.n_head, n_query_groups=2, n_embd=128,
                   intermediate_size=64, vocab_size=small.vocab_size, block_size=32)
    path = save_aligner(random_aligner(small), tmp_path / "tiny.safetensors", "tiny")
    with torch.device("meta"):
        model = LLaMA(other)
    with pytest.raises(AlignerFileError, match="tiny-wide"):
        attach(model, path)
    assert model.aligner is None


def test_same_shape_different_base_warns_naming_both(tmp_path):
    a = random_aligner(Config.from_name("Llama-2-7b-hf"), n_tokens=1)
    path = save_aligner(a, tmp_path / "a.safetensors", "Llama-2-7b-hf")
    b, meta = load_aligner(path)
    with pytest.warns(AlignerBaseWarning, match=r"Llama-2-7b-hf.*Llama-2-7b-chat-hf"):
        check_compatible(meta, Config.from_name("Llama-2-7b-chat-hf"), path)
    with pytest.warns(AlignerBaseWarning, match="llama-7b"):
        check_compatible(b, Config.from_name("llama-7b"), path, metadata=meta)


def test_same_base_or_alias_does_not_warn(tmp_path, recwarn):
    a = random_aligner(Config.from_name("Llama-2-7b-hf"), n_tokens=1)
    path = save_aligner(a, tmp_path / "a.safetensors", "Llama-2-7b-hf")
    _, meta = load_aligner(path)
    check_compatible(meta, Config.from_name("Llama-2-7b-hf"), path)
    check_compatible(meta, Config.from_name("llama2-7b"), path)
    assert not [w for w in recwarn if issubclass(w.category, AlignerBaseWarning)]


# ---------------------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_or_garbage_safetensors_gives_clear_error(tmp_path):
    good = save_aligner(random_aligner(Config.from_name("tiny")), tmp_path / "good.safetensors", "tiny")
    data = good.read_bytes()
    cases = {"empty": b"", "header-cut": data[:20], "data-cut": data[:-10], "garbage": bytes(range(256)) * 4}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(blob)
        with pytest.raises(AlignerFileError, match=f"{name}.safetensors") as e:
            load_aligner(bad)
        assert "safetensors" in str(e.value)


def test_missing_file_and_directory_give_clear_errors(tmp_path):
    with pytest.raises(AlignerFileError, match="no such Aligner file"):
        load_aligner(tmp_path / "nope.safetensors")
    with pytest.raises(AlignerFileError, match=r"directory, not an Aligner file: .*\(it holds none\)"):
        load_aligner(tmp_path)
    # a run directory: the error names the Aligner inside it (and not a base model's weights beside it)
    save_aligner(random_aligner(Config.from_name("tiny")), tmp_path / "aligner.safetensors", "tiny")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(AlignerFileError, match=r"inside it \(" + re.escape(str(tmp_path / "aligner.safetensors")) +
                       r"\)\.$"):
        load_aligner(tmp_path)


def test_base_model_weights_are_not_an_aligner(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"tok_embeddings.weight": torch.zeros(4, 2), "norm.weight": torch.ones(2), "x": torch.ones(1)},
              str(path))
    with pytest.raises(AlignerFileError, match="not a lit-aligner Aligner file"):
        load_aligner(path)


def test_shapes_inconsistent_with_header_are_rejected(tmp_path):
    path = save_aligner(random_aligner(Config.from_name("tiny"), n_tokens=3), tmp_path / "a.safetensors", "tiny")
    _, meta = load_aligner(path)
    bad = tmp_path / "bad.safetensors"
    save_file({"prefix": torch.zeros(3, 64), "gate": torch.zeros(5, 4)}, str(bad), metadata=meta)
    with pytest.raises(AlignerFileError, match=r"gate \(5, 4\)"):
        load_aligner(bad)
    save_file({"prefix": torch.zeros(3, 64)}, str(bad), metadata=meta)
    with pytest.raises(AlignerFileError, match="exactly the tensors"):
        load_aligner(bad)


def test_a_paper_pth_loads_like_our_file_through_the_one_loader(tmp_path):
    a = random_aligner(Config.from_name("tiny"))
    pth = export_paper_checkpoint(a, tmp_path / "paper.pth")
    b, meta = load_aligner(pth)
    assert torch.equal(b.prefix, a.prefix) and torch.equal(b.gate, a.gate) and meta["source"] == "paper:paper.pth"


def test_non_finite_aligner_files_are_refused_on_load(tmp_path):
    """A diverged run's Aligner would generate nothing; every format is checked on load."""
    a = random_aligner(Config.from_name("tiny"))
    with torch.no_grad():
        a.gate[1, 2] = float("nan")
    for path in (save_aligner(a, tmp_path / "nan.safetensors", "tiny"),
                 export_paper_checkpoint(a, tmp_path / "nan.pth")):
        with pytest.raises(AlignerFileError, match=r"gate hold NaN or infinite values.*--learning-rate"):
            load_aligner(path)


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"global_value_embedding.weight": torch.zeros(1, 4), "obj": Config()}, evil)
    with pytest.raises(AlignerFileError, match=r"not a checkpoint of plain tensors: it holds pickled Python") as e:
        import_paper_checkpoint(evil)
    assert "weights_only=False" not in str(e.value)  # torch's advice to run the file's code is never passed on


# ---------------------------------------------------------------------------------------------------------------
# The paper's checkpoints
# ---------------------------------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.parametrize("name", list(PAPER_FILES))
def test_paper_checkpoint_imports_with_right_shape_and_values(name):
    N, C, H, start, n_layer, base = PAPER_FILES[name]
    src = torch.load(PAPER_DIR / name, weights_only=True, map_location="cpu")
    a, meta = import_paper_checkpoint(PAPER_DIR / name)
    assert (a.n_tokens, a.n_embd, a.n_head, a.start_layer, a.n_layer) == (N, C, H, start, n_layer)
    assert meta["base_model"] == base and meta["source"] == f"paper:{name}"
    assert a.prefix.dtype == src[PAPER_PREFIX_KEY].dtype
    assert torch.equal(a.prefix, src[PAPER_PREFIX_KEY])
    for i in range(start, n_layer):
        assert torch.equal(a.gate[i - start], src[f"transformer.h.{i}.attn.gating_factor"].flatten())
    assert a.gate.abs().sum() > 0  # trained gates, not the zero init


@needs_shared
@pytest.mark.parametrize("name", list(PAPER_FILES))
def test_paper_export_round_trip_reproduces_keys_and_values(tmp_path, name):
    src = torch.load(PAPER_DIR / name, weights_only=True, map_location="cpu")
    a, meta = import_paper_checkpoint(PAPER_DIR / name)
    # Through our file format and back.
    ours = save_aligner(a, tmp_path / "a.safetensors", meta["base_model"], meta)
    b, _ = load_aligner(ours)
    out = export_paper_checkpoint(b, tmp_path / "back.pth")
    back = torch.load(out, weights_only=True, map_location="cpu")
    assert set(back) == set(src)
    for k in src:
        assert back[k].shape == src[k].shape and back[k].dtype == src[k].dtype, k
        assert torch.equal(back[k], src[k]), k


@needs_shared
def test_cli_imports_and_exports_a_paper_checkpoint(tmp_path):
    name = "alpaca-sft-llama2-7b-1token.pth"
    r = run_cli(PAPER_DIR / name, "--out", tmp_path / "a.safetensors")
    assert r.returncode == 0, r.stderr
    assert "N=1 " in r.stdout and "Llama-2-7b-hf" in r.stdout and "KiB" in r.stdout
    assert (tmp_path / "a.safetensors").stat().st_size < 32 * 1024
    r = run_cli(tmp_path / "a.safetensors", "--out", tmp_path / "a.pth", "--to", "paper")
    assert r.returncode == 0, r.stderr
    src = torch.load(PAPER_DIR / name, weights_only=True, map_location="cpu")
    back = torch.load(tmp_path / "a.pth", weights_only=True, map_location="cpu")
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)
    r = run_cli(tmp_path / "a.safetensors", "--out", tmp_path / "a.pth", "--to", "paper")
    assert r.returncode == 1 and "--force" in r.stderr


@needs_shared
def test_not_a_checkpoint_file_gives_clear_cli_error(tmp_path):
    r = run_cli(NOT_A_CHECKPOINT, "--out", tmp_path / "x.safetensors")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "not a checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_garbage_safetensors_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 7)
    r = run_cli(bad, "--out", tmp_path / "x.pth", "--to", "paper")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "bad.safetensors" in r.stderr
