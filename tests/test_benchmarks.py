"""CI smoke tests of benchmarks/train.py and benchmarks/generate.py on the `tiny` shape: they run on the CPU in seconds,
print their table and write a JSON file with machine information and one row per case."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def test_train_benchmark_reports_every_mode_and_policy(tmp_path, capsys):
    out = tmp_path / "train.json"
    load_script("train").main(config="tiny", batch=2, seq_len=16, mode=("sft", "dpo"),
                              checkpointing=("none", "selective", "block"), warmup=1, steps=2, device="cpu",
                              threads=1, peak_tflops=1.0, out=out)
    payload = json.loads(out.read_text())
    rows = payload["results"]
    assert [(r["mode"], r["checkpointing"]) for r in rows] == [
        (m, p) for m in ("sft", "dpo") for p in ("none", "selective", "block")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and len(r["step_times_s"]) == 3
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
        assert r["loss"] == r["loss"]  # finite, not NaN
    dpo, sft = rows[3]["flops_per_token"], rows[0]["flops_per_token"]
    assert dpo > sft  # the reference forward
    act = payload["activation_bytes_per_token_per_gated_layer"]
    assert act["none"] > act["selective"] > act["block"]
    machine = payload["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__
    assert "cpu" in payload["peak_memory_method"] or "resident" in payload["peak_memory_method"]
    assert "tokens_per_s" in capsys.readouterr().out


def test_generate_benchmark_covers_batch_1_and_16_with_and_without_aligners(tmp_path, capsys):
    out = tmp_path / "generate.json"
    load_script("generate").main(config="tiny", batch=16, prompt_len=6, new_tokens=6, repeats=1, device="cpu",
                                 threads=1, out=out)
    payload = json.loads(out.read_text())
    cases = [(r["case"], r["batch"]) for r in payload["results"]]
    assert cases == [("base", 1), ("aligner", 1), ("base", 16), ("aligner (shared)", 16),
                     ("16 different aligners", 16)]
    for r in payload["results"]:
        assert r["decode_tokens_per_s"] > 0 and r["decode_steps"] == 5
    assert payload["results"][-1]["vs_shared"] > 0
    assert payload["machine"]["command"] and payload["weight_bytes_per_step"] > 0
    assert "16 different aligners" in capsys.readouterr().out


def test_benchmark_cli_reports_a_bad_flag_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--config", "no-such-model",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --config") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_serve_benchmark_runs_the_real_server(tiny_checkpoint_dir, tmp_path, capsys):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    out = tmp_path / "serve.json"
    payload = load_script("serve").main(checkpoint_dir=tiny_checkpoint_dir, clients=[1, 3], requests_per_client=1,
                                        sequential_requests=2, max_tokens=3, aligners=3, n_tokens=4, max_batch=4,
                                        device="cpu", out=out)
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"]
    assert [(r["clients"], r["aligners"]) for r in rows] == [(1, "1 shared"), (3, "3 different"), (3, "1 shared")]
    for r in rows:
        assert r["completion_tokens"] == 3 * r["requests"]  # ignore_eos: exactly max_tokens each
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p95_s"]
    assert rows[0]["x_sequential"] == 1 and rows[2]["x_shared"] == 1
    assert "tokens_per_s" in capsys.readouterr().out


@pytest.mark.slow
def test_quality_benchmark_compares_aligner_lora_and_prefix_tuning_on_the_same_rows(tiny_checkpoint_dir, tmp_path):
    pytest.importorskip("peft")
    from lit_aligner.data import default as default_data

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(default_data.generate_rows(120, seed=4)))
    out = tmp_path / "quality.json"
    payload = load_script("quality").main(checkpoint_dir=tiny_checkpoint_dir, data=data, template="plain",
                                          max_seq_length=128, heldout=24, steps=3, batch=4, micro_batch=2,
                                          warmup_steps=1, aligners=["2:normal", "2:hidden"], aligner_lrs=[0.05],
                                          lora_lrs=[1e-2], prefix_lrs=[1e-2], device="cpu", out=out)
    runs = {(r["label"], r.get("init")): r for r in json.loads(out.read_text())["runs"]}
    base = runs[("base (no training)", None)]
    assert base["relative_difference"] < 1e-4  # our model and transformers agree on the bare base
    lora = runs[("LoRA r=8 (q, v)", None)]
    aligner = runs[("Aligner N=2", "normal")]
    assert aligner["trainable_params"] == 2 * 64 + (4 - 2) * 4  # N * n_embd + (n_layer - start_layer) * n_head
    # r=8 on q (64 -> 64) and v (64 -> 2 KV heads x 16) in each of the 4 layers: A (8 x in) + B (out x 8)
    assert lora["trainable_params"] == 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    for r in runs.values():
        assert r["heldout_loss"] == r["heldout_loss"] and r["peak_memory_gb"] > 0
        if r is not base:
            assert r["heldout_loss"] != base["heldout_loss"] and r["train_tokens_per_s"] > 0
    assert payload["best"][0] is not None and "sanity" in payload
    # --resume keeps what ran and runs only what is new; other settings are refused
    quality = load_script("quality")
    again = quality.main(checkpoint_dir=tiny_checkpoint_dir, data=data, template="plain", max_seq_length=128,
                         heldout=24, steps=3, batch=4, micro_batch=2, warmup_steps=1, aligners=["2:normal"],
                         aligner_lrs=[0.05], gate_lr_ratios=[1.0, 3.0], start_layers=[2, 1], lora_lrs=[],
                         prefix_lrs=[], device="cpu", out=out, resume=True)
    assert len(again["runs"]) == len(runs) + 3  # (gate x1, layer 2) ran before
    kept = {(r["label"], r.get("init"), r.get("lr")): r["wall_s"] for r in again["runs"]
            if r.get("gate_lr_ratio", 1) == 1 and r.get("start_layer", 2) == 2}
    assert all(kept[(r["label"], r.get("init"), r.get("lr"))] == r["wall_s"] for r in runs.values())
    new = {(r["gate_lr_ratio"], r["start_layer"]): r for r in again["runs"] if r.get("init") == "normal"}
    assert new[(1.0, 1)]["trainable_params"] == 2 * 64 + (4 - 1) * 4
    assert new[(3.0, 2)]["heldout_loss"] != new[(1.0, 2)]["heldout_loss"]
    with pytest.raises(quality.BenchmarkError, match="other settings"):
        quality.main(checkpoint_dir=tiny_checkpoint_dir, data=data, template="plain", max_seq_length=128, heldout=24,
                     steps=4, batch=4, micro_batch=2, warmup_steps=1, aligners=["2:normal"], aligner_lrs=[0.05],
                     lora_lrs=[], prefix_lrs=[], device="cpu", out=out, resume=True)
