"""Getting models and datasets from the Hugging Face Hub (scripts/download.py, the prepare scripts without
--data-file). No test reaches the network: the download path runs in the client's own offline mode
(HF_HUB_OFFLINE=1) against a Hugging Face cache that each test populates with the real cache layout
(`<repo type>s--<org>--<name>/refs/main` + `snapshots/<commit>/...`); the gated-repo path substitutes the client's
file-listing call with one that raises the client's GatedRepoError."""

import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_aligner.hub import HubError, download_model, select_model_files

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache: Path, repo_id: str, repo_type: str = "model") -> Path:
    """The snapshot folder of `repo_id` in a Hugging Face cache at `cache` (created, with refs/main)."""
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    snap = root / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    return snap


def offline_env(cache: Path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent),
            "OMP_NUM_THREADS": "1"}


def run_script(*args, env):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=env)


def test_only_what_conversion_needs_is_selected_with_safetensors_preferred():
    files = ["README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
             "tokenizer.json", "tokenizer_config.json", "original/consolidated.00.pth", "onnx/model.onnx"]
    assert select_model_files(files) == ["config.json", "generation_config.json", "tokenizer.json",
                                         "tokenizer_config.json", "model-00001-of-00002.safetensors",
                                         "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert select_model_files(["config.json", "pytorch_model.bin", "tokenizer.model"]) == \
        ["config.json", "tokenizer.model", "pytorch_model.bin"]


def test_download_convert_from_the_cache_in_offline_mode_gives_the_model(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    cache = tmp_path / "hub"
    snap = cached_repo(cache, "someorg/Tiny-Qwen2")
    hf.save_pretrained(snap)
    torch.save({"decoy": torch.zeros(1)}, snap / "pytorch_model.bin")  # never read: safetensors are preferred
    r = run_script("scripts/download.py", "someorg/Tiny-Qwen2", "--convert", "--out-dir", tmp_path / "ckpt",
                   env=offline_env(cache))
    assert r.returncode == 0, r.stderr
    from lit_aligner.base import load_model

    model = load_model(tmp_path / "ckpt", dtype=torch.float32)
    assert model.config.name == "Tiny-Qwen2" and model.config.attn_bias
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        assert (model(ids, aligner=False) - hf(ids).logits).abs().max() < 1e-4
    r = run_script("scripts/download.py", "someorg/not-cached", "--convert", env=offline_env(cache))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: someorg/not-cached is not in the local Hugging Face cache")


def test_a_gated_repo_without_a_token_is_one_line_saying_what_to_do(monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        e = GatedRepoError.__new__(GatedRepoError)
        e.args = ("401 Client Error: access to model meta-llama/Llama-3.2-1B is restricted",)
        raise e

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", gated)
    with pytest.raises(HubError, match=r"meta-llama/Llama-3.2-1B is gated: accept its terms at "
                                       r"https://huggingface.co/meta-llama/Llama-3.2-1B .*--access-token"):
        download_model("meta-llama/Llama-3.2-1B")


def test_no_network_is_one_line_and_the_hubs_retry_warnings_stay_quiet(monkeypatch, capfd):
    """huggingface_hub >= 1.0 talks through httpx, whose connection errors are no OSError: they are one HubError
    line too, and the warning the Hub's client logs at each retry does not reach the terminal."""
    import importlib

    import huggingface_hub
    from huggingface_hub import constants, errors

    client = importlib.import_module(errors.HTTPError.__module__.split(".")[0])  # httpx (or requests before 1.0)
    refused = getattr(client, "ConnectError", getattr(client, "ConnectionError", None))

    def unreachable(*args, **kwargs):
        logging.getLogger("huggingface_hub.utils._http").warning("'refused' thrown while requesting GET /api")
        raise refused("[Errno 111] Connection refused")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    level = logging.getLogger("huggingface_hub").level
    with pytest.raises(HubError, match=r"HuggingFaceTB/SmolLM2-135M-Instruct: cannot reach the Hub \(.*Connection "
                                       r"refused\); check the network"):
        download_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "thrown while requesting" not in capfd.readouterr().err
    assert logging.getLogger("huggingface_hub").level == level  # its level is given back


def test_quiet_retries_holds_when_the_hub_is_first_imported_inside_it():
    """The Hub sets its logger's level when its logging module is first imported, which may happen inside the block
    (lm_eval imports it lazily): the block's level must hold all the same."""
    code = ("import logging\nfrom lit_aligner.hub import quiet_retries\nwith quiet_retries():\n"
            "    import huggingface_hub.utils.logging\n"
            "    print(logging.getLogger('huggingface_hub').getEffectiveLevel())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == str(logging.ERROR), r.stderr


def test_prepare_scripts_read_their_hub_datasets_from_the_cache(tmp_path, tiny_checkpoint_dir):
    cache = tmp_path / "hub"
    hh = cached_repo(cache, "Anthropic/hh-rlhf", "dataset")
    (hh / "harmless-base").mkdir()
    rows = [{"chosen": f"\n\nHuman: question {i}?\n\nAssistant: a safe answer {i}",
             "rejected": f"\n\nHuman: question {i}?\n\nAssistant: a bad answer {i}"} for i in range(30)]
    with gzip.open(hh / "harmless-base" / "train.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pku = cached_repo(cache, "PKU-Alignment/PKU-SafeRLHF", "dataset")
    for subset in ("Alpaca-7B", "Alpaca2-7B"):
        (pku / "data" / subset).mkdir(parents=True)
        (pku / "data" / subset / "train.jsonl").write_text("".join(json.dumps({
            "prompt": f"{subset} prompt {i}", "response_0": "yes", "response_1": "no", "is_response_0_safe": False,
            "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1}) + "\n" for i in range(10)))
    env = offline_env(cache)
    r = run_script("scripts/prepare_hh.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "hh",
                   env=env)
    assert r.returncode == 0, r.stderr
    assert "rows_read=30" in r.stdout and "kept=30" in r.stdout
    r = run_script("scripts/prepare_pku.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir", tmp_path / "pku",
                   env=env)
    assert r.returncode == 0, r.stderr
    assert "rows_read=20" in r.stdout  # both subsets' train splits, read as one dataset
    r = run_script("scripts/prepare_alpaca.py", "--checkpoint-dir", tiny_checkpoint_dir, "--out-dir",
                   tmp_path / "alpaca", env=env)
    assert r.returncode == 1 and "tatsu-lab/alpaca is not in the local Hugging Face cache" in r.stderr


def test_parquet_files_are_read_like_json_rows(tmp_path, tiny_checkpoint_dir):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lit_aligner.data import DataOptions, load_data
    from lit_aligner.tokenizer import Tokenizer

    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    tok = Tokenizer(tiny_checkpoint_dir)
    a = load_data("sft", tmp_path / "alpaca.parquet", tok, "alpaca", DataOptions(val_fraction=0.0))
    b = load_data("sft", tmp_path / "alpaca.json", tok, "alpaca", DataOptions(val_fraction=0.0))
    assert a[2]["container"] == "parquet" and a[0].rows() and all(
        torch.equal(x, y) for ra, rb in zip(a[0].rows(), b[0].rows()) for x, y in zip(ra, rb))


def test_prepare_json_reads_a_hub_chat_dataset_from_the_cache(tmp_path, tiny_checkpoint_dir):
    """prepare_json.py --hub-repo: UltraFeedback-binarized-style parquet shards (prompt text, chosen / rejected whole
    conversations, messages) from the cache, as preference pairs and as SFT on every answer: the same rows as loading
    the rows themselves."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lit_aligner.data import DataOptions, load_data, load_prepared
    from lit_aligner.tokenizer import Tokenizer

    def conv(i, answer):
        return [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"first {i}."},
                {"role": "user", "content": f"and {i}?"}, {"role": "assistant", "content": answer}]

    rows = [{"prompt": f"and {i}?", "chosen": conv(i, f"good {i}."), "rejected": conv(i, f"bad {i}."),
             "messages": conv(i, f"good {i}."), "score_chosen": 8.0, "score_rejected": 3.0} for i in range(24)]
    snap = cached_repo(tmp_path / "hub", "HuggingFaceH4/ultrafeedback_binarized", "dataset")
    (snap / "data").mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(rows[12 * k:12 * (k + 1)]),
                       snap / "data" / f"train_prefs-0000{k}-of-00002.parquet")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    env = offline_env(tmp_path / "hub")
    tok = Tokenizer(tiny_checkpoint_dir)
    for kind, extra in (("preference", []), ("sft", ["--turns", "all"])):
        out = tmp_path / kind
        r = run_script("scripts/prepare_json.py", "--hub-repo", "HuggingFaceH4/ultrafeedback_binarized", "--hub-files",
                       "data/train_prefs-*.parquet", "--kind", kind, "--val-fraction", "0", "--checkpoint-dir",
                       tiny_checkpoint_dir, "--out-dir", out, *extra, env=env)
        assert r.returncode == 0, r.stderr
        assert "format messages" in r.stdout and "rows_read=24" in r.stdout
        got, _, meta = load_prepared(out, kind, tok)
        want, _, _ = load_data(kind, tmp_path / "rows.json", tok, meta["template"],
                               DataOptions(val_fraction=0.0, turns="all" if extra else "last"))
        assert len(got) == len(want) == 24 and got.answers() == (24 if kind == "preference" else 48)
        assert all(torch.equal(x, y) for a, b in zip(got.rows(), want.rows()) for x, y in zip(a, b))
