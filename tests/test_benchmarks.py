"""CI smoke tests of benchmarks/train.py, generate.py and profile_steps.py on the `tiny` shape: they run on the CPU in
seconds, print their table and write a JSON file with machine information and one row per case."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers

REPO = Path(__file__).resolve().parent.parent


load_script = helpers.load_benchmark


@pytest.fixture(autouse=True)
def keep_threads():
    prev = torch.get_num_threads()
    yield
    torch.set_num_threads(prev)


def test_train_benchmark_reports_every_mode_and_policy_and_the_peer(tmp_path, capsys):
    out = tmp_path / "train.json"
    load_script("train").main(config="tiny", batch=2, seq_len=16, mode=("sft", "dpo"),
                              checkpointing=("none", "selective", "block"), warmup=1, steps=2, device="cpu",
                              threads=1, peak_tflops=1.0, out=out)
    payload = json.loads(out.read_text())
    rows = payload["results"]
    ours = [r for r in rows if r["system"] == "Aligner (lit-aligner)"]
    assert [(r["mode"], r["checkpointing"]) for r in ours] == [
        (m, p) for m in ("sft", "dpo") for p in ("none", "selective", "block")]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 and len(r["step_times_s"]) == 3
        assert r["loss"] == r["loss"]  # finite, not NaN
    for r in ours:
        assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 1.0)
    # the peer in the same run, on the same rows, under none and transformers' gradient checkpointing: for SFT, PEFT
    # LoRA r=8 and prefix tuning (PEFT refuses prefix tuning with checkpointing); for DPO, the LoRA trained by TRL
    peers = [(r["system"], r["mode"], r["checkpointing"]) for r in rows[len(ours):]]
    trl = "LoRA r=8 (PEFT, TRL DPOTrainer)"
    assert peers == [("LoRA r=8 (PEFT)", "sft", "none"), ("prefix tuning 10 (PEFT)", "sft", "none"),
                     ("LoRA r=8 (PEFT)", "sft", "block"), (trl, "dpo", "none"), (trl, "dpo", "block")]
    assert payload["peers"] == ["LoRA r=8 (PEFT)", "prefix tuning 10 (PEFT)", trl]
    assert set(payload["peer_versions"]) == {"transformers", "peft", "trl"}
    lora = {(r["mode"], r["checkpointing"]): r for r in rows if r["system"] in ("LoRA r=8 (PEFT)", trl)}
    assert lora["sft", "none"]["trainable_params"] > 10 * ours[0]["trainable_params"]
    for r in ours[:3:2] + ours[3::2]:  # our rows under none and block, each a multiple of its LoRA's speed
        assert r["vs_lora"] == pytest.approx(r["tokens_per_s"] / lora[r["mode"], r["checkpointing"]]["tokens_per_s"])
    assert "vs_lora" not in ours[1] and "vs_lora" not in ours[4]  # selective: no counterpart
    # the loss column means one thing for every system: per response token (SFT: about ln(vocab) on random weights)
    assert ours[0]["loss"] == pytest.approx(lora["sft", "none"]["loss"], rel=0.1)
    for r in (lora["dpo", "none"], lora["dpo", "block"]):  # TRL's DPO: the reference is the base without the adapter,
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-6)  # which LoRA (B = 0) starts equal to,
        assert r["loss"] < r["first_loss"]  # and the same pairs every step: the loss falls
    dpo, sft = ours[3]["flops_per_token"], ours[0]["flops_per_token"]
    assert dpo > sft  # the reference forward
    act = payload["activation_bytes_per_token_per_gated_layer"]
    assert act["none"] > act["selective"] > act["block"]
    machine = payload["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["torch"] == torch.__version__
    assert "cpu" in payload["peak_memory_method"] or "resident" in payload["peak_memory_method"]
    assert "tokens_per_s" in capsys.readouterr().out


def test_a_peer_that_fails_to_compile_is_timed_eager_and_says_why(tmp_path, monkeypatch, capsys):
    module = load_script("train")
    monkeypatch.setattr(sys.modules["common"], "compile_blocks", lambda model: model)  # ours: eager, but "compiled"
    real = module.run_peer

    def run_peer(*args, **kwargs):
        if args[-1]:  # compiled
            raise RuntimeError("inductor failed\nlong trace")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "run_peer", run_peer)
    payload = module.main(config="tiny", batch=2, seq_len=16, compile=True, warmup=0, steps=1, device="cpu", threads=1,
                          out=tmp_path / "train.json")
    peers = payload["results"][1:]
    assert [r["system"] for r in peers] == ["LoRA r=8 (PEFT)", "prefix tuning 10 (PEFT)"]
    assert all(r["compile"] is False and r["compile_error"] == "RuntimeError: inductor failed" for r in peers)
    assert payload["results"][0]["vs_lora"] > 0 and payload["complete"]
    assert "did not compile (RuntimeError: inductor failed); timing it eager" in capsys.readouterr().err


def test_train_benchmark_on_a_quantized_base_runs_beside_qlora(tmp_path):
    payload = load_script("train").main(config="tiny", batch=2, seq_len=16, quantize=("none", "bnb.nf4"), warmup=1,
                                        steps=1, device="cpu", threads=1, out=tmp_path / "t.json")
    rows = {(r["system"], r["quantize"]): r for r in payload["results"]}
    ours, q4, qlora = (rows["Aligner (lit-aligner)", "none"], rows["Aligner (lit-aligner)", "bnb.nf4"],
                       rows["QLoRA r=8 (PEFT, bitsandbytes)", "bnb.nf4"])
    assert len(rows) == 5 and ("LoRA r=8 (PEFT)", "none") in rows  # the float rows and their peers are all there
    assert q4["weights_gb"] < 0.5 * ours["weights_gb"]  # the blocks in 4 bits (the tiny model's embedding stays)
    assert qlora["weights_gb"] == pytest.approx(q4["weights_gb"], rel=0.1)  # the same base held the same way
    assert q4["vs_lora"] == pytest.approx(q4["tokens_per_s"] / qlora["tokens_per_s"])
    assert q4["trainable_params"] == ours["trainable_params"] and math.isfinite(q4["loss"])
    assert "QLoRA r=8 (PEFT, bitsandbytes)" in payload["peers"]


def test_simpo_rows_run_no_reference_pass_beside_trls_cpo_trainer(tmp_path):
    payload = load_script("train").main(config="tiny", batch=4, seq_len=16, mode=("dpo", "simpo"), warmup=1, steps=2,
                                        device="cpu", threads=1, out=tmp_path / "t.json")
    rows = {(r["system"], r["mode"]): r for r in payload["results"]}
    ours_dpo, ours_simpo = rows["Aligner (lit-aligner)", "dpo"], rows["Aligner (lit-aligner)", "simpo"]
    peer = rows["LoRA r=8 (PEFT, TRL CPOTrainer SimPO)", "simpo"]
    # the same pairs, no reference forward: SimPO costs what SFT costs per token, less than DPO
    assert ours_simpo["flops_per_token"] < ours_dpo["flops_per_token"]
    assert ours_simpo["vs_lora"] == pytest.approx(ours_simpo["tokens_per_s"] / peer["tokens_per_s"])
    assert math.isfinite(ours_simpo["loss"]) and math.isfinite(peer["loss"])
    assert payload["peers"] == ["LoRA r=8 (PEFT, TRL DPOTrainer)", "LoRA r=8 (PEFT, TRL CPOTrainer SimPO)"]
    assert "trl" in payload["peer_versions"]


def test_kto_rows_beside_trls_kto_trainer(tmp_path):
    payload = load_script("train").main(config="tiny", batch=4, seq_len=16, mode=("kto",), warmup=1, steps=2,
                                        device="cpu", threads=1, out=tmp_path / "t.json")
    rows = {(r["system"], r["mode"]): r for r in payload["results"]}
    ours, peer = rows["Aligner (lit-aligner)", "kto"], rows["LoRA r=8 (PEFT, TRL KTOTrainer)", "kto"]
    from lit_aligner.config import Config
    from lit_aligner.perf import train_flops_per_token

    # three no-grad forwards beside the policy's step: more than DPO's one
    assert ours["flops_per_token"] == train_flops_per_token(Config.from_name("tiny"), 16, 10, 2, "kto", 4).total
    assert ours["flops_per_token"] > train_flops_per_token(Config.from_name("tiny"), 16, 10, 2, "dpo", 4).total
    assert ours["vs_lora"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
    # TRL's first step: the adapter starts as the base, so every completion's loss is 1 - sigmoid(0) and z is 0
    assert peer["first_loss"] == pytest.approx(0.5, abs=1e-4) and math.isfinite(ours["loss"])
    assert payload["peers"] == ["LoRA r=8 (PEFT, TRL KTOTrainer)"] and "trl" in payload["peer_versions"]


def test_the_dpo_peer_without_trl_names_the_extra_and_the_flag_before_anything_runs(tmp_path, monkeypatch):
    module = load_script("train")
    monkeypatch.setitem(sys.modules, "trl", None)  # as if it were not installed
    with pytest.raises(module.BenchmarkError, match=r"needs trl: pip install -e '\.\[eval\]' \(or --no-peer\)"):
        module.main(config="tiny", batch=2, seq_len=16, mode=("dpo",), device="cpu", out=tmp_path / "t.json")
    assert not list(tmp_path.iterdir())
    payload = module.main(config="tiny", batch=2, seq_len=16, mode=("sft",), warmup=0, steps=1, device="cpu",
                          threads=1, out=tmp_path / "t.json")  # SFT and its peer need no trl
    assert "trl" not in payload["peer_versions"] and len(payload["results"]) == 3


def test_generate_benchmark_covers_batch_1_and_16_with_and_without_aligners_and_the_peer(tmp_path, capsys):
    out = tmp_path / "generate.json"
    # the peer's decode time is a 24-token run less a 1-token one: enough steps that timing noise (another test
    # process on the same cores) cannot make it negative
    load_script("generate").main(config="tiny", batch=16, prompt_len=6, new_tokens=24, repeats=1, device="cpu",
                                 threads=1, out=out)
    payload = json.loads(out.read_text())
    rows = payload["results"]
    cases = [(r["case"], r["batch"]) for r in rows if r["system"] == "lit-aligner"]
    assert cases == [("base", 1), ("aligner", 1), ("aligner (shared)", 16), ("16 different aligners", 16),
                     ("base", 16)]  # the targets' cases first: a run cut short keeps them
    # then the peer, in the same run: transformers' generate for the base, PEFT LoRA for the alignments
    peer = [(r["case"], r["batch"]) for r in rows if r["system"] == payload["peer"]]
    assert payload["peer"] == "transformers + PEFT" and peer == [
        ("base", 1), ("base", 16), ("LoRA r=8", 1), ("LoRA r=8 (shared)", 16), ("16 different LoRAs", 16)]
    for r in rows:
        assert r["decode_tokens_per_s"] > 0 and r["decode_steps"] == 23
    assert all(r["vs_peer"] > 0 for r in rows[:5]) and not any("vs_peer" in r for r in rows[5:])
    assert rows[3]["vs_shared"] > 0 and rows[2]["vs_base"] > 0 and rows[9]["vs_shared"] > 0
    assert rows[3]["vs_peer"] == pytest.approx(rows[3]["decode_tokens_per_s"] / rows[9]["decode_tokens_per_s"])
    assert payload["complete"] and payload["machine"]["command"] and payload["weight_bytes_per_step"] > 0
    printed = capsys.readouterr().out
    assert "16 different aligners" in printed and "16 different LoRAs" in printed


def test_a_benchmark_stopped_midway_keeps_its_rows_and_leaves_the_old_results_alone(tmp_path):
    out = tmp_path / "generate.json"
    out.write_text('{"old": true}')
    module = load_script("generate")
    real, calls = module.generate, []

    def generate_then_fail(*args, **kwargs):  # the third case's first call fails (say, out of memory)
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("stopped")
        return real(*args, **kwargs)

    module.generate = generate_then_fail
    with pytest.raises(RuntimeError, match="stopped"):
        module.main(config="tiny", batch=4, prompt_len=4, new_tokens=4, repeats=1, device="cpu", threads=1, out=out,
                    force=True, peer=False)
    partial = json.loads((tmp_path / "generate.partial.json").read_text())
    assert not partial["complete"] and [r["case"] for r in partial["results"]] == ["base", "aligner"]
    assert json.loads(out.read_text()) == {"old": True}  # replaced only by a complete run
    module.generate = real
    module.main(config="tiny", batch=4, prompt_len=4, new_tokens=4, repeats=1, device="cpu", threads=1, out=out,
                force=True, peer=False)
    assert json.loads(out.read_text())["complete"] and not (tmp_path / "generate.partial.json").exists()


def test_profile_groups_each_step_by_kind_and_sees_the_aligner(tmp_path, capsys):
    out = tmp_path / "profile.json"
    torch.set_num_threads(1)
    load_script("profile_steps").main(config="tiny", batch=2, seq_len=16, checkpointing=("none", "block"),
                                      decode_batch=3, new_tokens=6, device="cpu", out=out)
    payload = json.loads(out.read_text())
    rows = {(r["what"], r["case"]): r for r in payload["results"]}
    assert list(rows) == [("train", "sft none"), ("train", "sft block"), ("decode", "base-1"), ("decode", "aligner-1"),
                          ("decode", "shared-B"), ("decode", "different-B")]
    assert payload["complete"]
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["kernels_per_step"] > 0 and r["top"]
        assert sum(r["ms_per_step_by_kind"].values()) == pytest.approx(r["device_ms_per_step"])
    # The Aligner's prefix attention is extra work in every gated layer of a decoding step.
    assert rows[("decode", "aligner-1")]["kernels_per_step"] > rows[("decode", "base-1")]["kernels_per_step"]
    assert rows[("train", "sft none")]["peak_memory_gb"] > 0
    assert "kernels_per_step" in capsys.readouterr().out


def test_benchmark_cli_reports_a_bad_flag_in_one_line(tmp_path):
    proc = helpers.run_script(REPO / "benchmarks" / "train.py", "--config", "no-such-model", "--out",
                              tmp_path / "x.json", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: --config") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_serve_benchmark_runs_the_real_server_beside_transformers_serve(tiny_checkpoint_dir, tmp_path, capsys):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    pytest.importorskip("transformers.cli.serve")
    out = tmp_path / "serve.json"
    payload = load_script("serve").main(checkpoint_dir=tiny_checkpoint_dir, clients=[1, 3], requests_per_client=1,
                                        sequential_requests=2, max_tokens=3, aligners=3, n_tokens=4, max_batch=4,
                                        device="cpu", long_prompt_tokens=40, chunk_tokens=8, stall_clients=2,
                                        stall_max_tokens=6, system_prompt_tokens=40, system_clients=2, out=out)
    rows = json.loads(out.read_text())["rows"]
    assert rows == payload["rows"] and payload["peers"] == ["transformers serve"]
    ours, peer = "lit-aligner", "transformers serve"
    assert [(r["server"], r["clients"], r["aligners"]) for r in rows] == [
        (ours, 1, "1 shared"), (ours, 1, "bare base"), (ours, 3, "3 different"), (ours, 3, "1 shared"),
        (ours, 3, "bare base"), (peer, 1, "bare base"), (peer, 3, "bare base")]
    for r in rows:
        # exactly max_tokens each: ours ignores end tokens on request, the peer is given min_new_tokens
        assert r["completion_tokens"] == 3 * r["requests"], r
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p95_s"]
        same = next(p for p in rows if p["server"] == peer and p["clients"] == r["clients"])
        assert r["x_peer"] == pytest.approx(r["tokens_per_s"] / same["tokens_per_s"])
    assert rows[0]["x_sequential"] == 1 and rows[3]["x_shared"] == 1 and rows[5]["x_sequential"] == 1
    # the stall case: our server prefilling the long prompt whole (budget 2048) and in chunks of 8, then the peer
    stalls = payload["stall_rows"]
    assert [(s["server"], s["prefill_budget"]) for s in stalls] == [(ours, 2048), (ours, 8), (peer, 2048), (peer, 8)]
    for s in stalls:
        assert s["clients"] == 2 and s["long_prompt_tokens"] == 40 and s["long_ttft_s"] > 0
        assert 0 < s["max_gap_s"] and s["stall_max_gap_s"] <= s["max_gap_s"]
    # prefix caching: clients sharing a system prompt, our server with its cache and without, then the peer
    prefix = payload["prefix_rows"]
    assert [(p["server"], p["prefix_cache"]) for p in prefix] == [(ours, "on"), (ours, "off"), (peer, "block sharing")]
    for p in prefix:
        assert p["clients"] == 2 and p["requests"] == 2 and p["completion_tokens"] == 6 and p["ttft_p50_s"] > 0
        assert p["prompt_tokens"] > 2 * 40
    assert prefix[0]["cached_share"] > 0.3 and prefix[1]["cached_share"] == 0
    out_text = capsys.readouterr().out
    assert "tokens_per_s" in out_text and "stall_max_gap_s" in out_text and "cached_share" in out_text


def test_serve_benchmark_without_the_peer_runs_only_the_server_and_a_stopped_run_keeps_its_rows(tiny_checkpoint_dir,
                                                                                                  tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    out, partial = tmp_path / "serve.json", tmp_path / "serve.partial.json"
    out.write_text('{"old": true}')
    module = load_script("serve")
    real, calls = module.run_case, []

    async def run_case_then_fail(*args, **kwargs):  # the warm-up, the first measured case, then the second one fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("stopped")
        return await real(*args, **kwargs)

    settings = dict(checkpoint_dir=tiny_checkpoint_dir, clients=[2], requests_per_client=1, max_tokens=2, aligners=2,
                    n_tokens=2, max_batch=2, device="cpu", peer=False, long_prompt_tokens=0, system_prompt_tokens=0,
                    out=out, force=True)
    module.run_case = run_case_then_fail
    with pytest.raises(module.BenchmarkError, match="stopped"):
        module.main(**settings)
    kept = json.loads(partial.read_text())
    assert not kept["complete"] and [(r["clients"], r["aligners"]) for r in kept["rows"]] == [(2, "2 different")]
    assert json.loads(out.read_text()) == {"old": True}  # replaced only by a complete run
    module.run_case = real
    payload = module.main(**settings)
    assert json.loads(out.read_text())["complete"] and not partial.exists()
    assert {r["server"] for r in payload["rows"]} == {"lit-aligner"} and payload["peers"] == []
    assert payload["stall_rows"] == [] == payload["prefix_rows"]  # 0 tokens skip the stall and prefix cases
    assert all(r["x_peer"] is None for r in payload["rows"])


@pytest.mark.slow
def test_quality_benchmark_compares_aligner_lora_and_prefix_tuning_on_the_same_rows(tiny_checkpoint_dir, tmp_path,
                                                                                   monkeypatch):
    pytest.importorskip("peft")
    from lit_aligner.data import default as default_data
    from lit_aligner.training import SFTRunConfig, TrainConfig

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(default_data.generate_rows(120, seed=4)))
    out = tmp_path / "quality.json"
    quality = load_script("quality")
    # each system in this process: a fresh interpreter per system (the benchmark's isolation, exercised by the
    # signal test below) would cost ~10 s of imports per run here
    monkeypatch.setattr(quality, "run_child", lambda spec, common, tmp: quality.run_system(spec, common))
    common = dict(checkpoint_dir=tiny_checkpoint_dir, data=data, template="plain", max_seq_length=128, heldout=24,
                  steps=3, batch=4, micro_batch=2, warmup_steps=1, device="cpu", out=out)
    kept = tmp_path / "aligners"
    payload = quality.main(**common, aligners=["2:hidden"], aligner_lrs=[0.05], lora_lrs=[1e-2], prefix_lrs=[1e-2],
                           save_aligners=kept)
    runs = {(r["label"], r.get("init")): r for r in json.loads(out.read_text())["runs"]}
    base = runs[("base (no training)", None)]
    assert base["relative_difference"] < 1e-4  # our model and transformers agree on the bare base
    lora = runs[("LoRA r=8 (q, v)", None)]
    ours, paper = runs[("Aligner N=2", "hidden")], runs[("Aligner N=2", "normal")]
    assert ours["gate_lr_ratio"] == TrainConfig().gate_lr_ratio  # the trainer's default, unless swept
    assert (paper["lr"], paper["gate_lr_ratio"], paper["start_layer"]) == (9e-3, 1.0, 2)  # --paper (the default)
    assert paper["trainable_params"] == 2 * 64 + (4 - 2) * 4  # N * n_embd + (n_layer - start_layer) * n_head
    # r=8 on q (64 -> 64) and v (64 -> 2 KV heads x 16) in each of the 4 layers: A (8 x in) + B (out x 8)
    assert lora["trainable_params"] == 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    for r in runs.values():
        assert r["heldout_loss"] == r["heldout_loss"] and r["peak_memory_gb"] > 0
        if r is not base:
            assert r["heldout_loss"] != base["heldout_loss"] and r["train_tokens_per_s"] > 0
            assert 0 < r["final_train_loss"] < 20  # every trained system reports its last step's loss
        assert r["command"] == payload["machine"]["command"]  # each run names the command that made it
    assert payload["best"][0] is not None and "sanity" in payload
    # --save-aligners kept each Aligner run's file: it scores the held-out loss the run reported
    from lit_aligner.aligner_files import load_aligner
    from lit_aligner.base import load_base
    from lit_aligner.files import UserError

    files = sorted(p.name for p in kept.iterdir())
    assert files == ["aligner-N2-hidden-x0.5-lr0.05-gate0.3-layer2-seed42.safetensors",
                     "aligner-N2-normal-x1-lr0.009-gate1-layer2-seed42.safetensors"]
    model, tok = load_base(tiny_checkpoint_dir, "cpu", "float32")
    aligner, _ = load_aligner(kept / files[0], model)
    _, _, val, _ = quality.load_rows({**common, "seed": 42})
    assert quality.heldout_loss(lambda ids, mask: model(ids, aligner=aligner), val, tok.pad_id,
                                torch.device("cpu")) == pytest.approx(ours["heldout_loss"], rel=1e-6)
    with pytest.raises(UserError, match="--save-aligners"):  # never over a kept file without --force
        quality.main(**{**common, "out": tmp_path / "other.json"}, aligners=["2:hidden"], aligner_lrs=[0.05],
                     paper=False, lora_lrs=[], prefix_lrs=[], save_aligners=kept)
    with pytest.raises(UserError, match="one of this command's inputs"):  # not even with --force
        quality.main(**{**common, "out": data}, force=True, aligners=["2:hidden"], lora_lrs=[], prefix_lrs=[])
    assert payload["settings"]["min_lr_ratio"] == TrainConfig().min_lr_ratio
    # --resume keeps what ran and runs only what is new; other settings are refused
    again = quality.main(**common, aligners=["2:hidden"], aligner_lrs=[0.05], gate_lr_ratios=[0.3, 3.0],
                         start_layers=[2, 1], lora_lrs=[], prefix_lrs=[], resume=True)
    assert len(again["runs"]) == len(runs) + 3  # (gate x0.3, layer 2) and the paper's run ran before
    kept = {(r["label"], r.get("init"), r.get("lr"), r.get("gate_lr_ratio"), r.get("start_layer")): r["wall_s"]
            for r in again["runs"]}
    assert all(kept[(r["label"], r.get("init"), r.get("lr"), r.get("gate_lr_ratio"), r.get("start_layer"))]
               == r["wall_s"] for r in runs.values())
    new = {(r["gate_lr_ratio"], r["start_layer"]): r for r in again["runs"] if r.get("init") == "hidden"}
    assert new[(0.3, 1)]["trainable_params"] == 2 * 64 + (4 - 1) * 4
    assert new[(3.0, 2)]["heldout_loss"] != new[(0.3, 2)]["heldout_loss"]
    # the prefix's starting scale is swept like the rates (the paper's normal run is not redone: it ignores it)
    scaled = quality.main(**common, aligners=["2:hidden"], aligner_lrs=[0.05], init_scales=[2.0], lora_lrs=[],
                          prefix_lrs=[], resume=True)
    assert len(scaled["runs"]) == len(again["runs"]) + 1
    by_scale = {r["init_scale"]: r for r in scaled["runs"] if r.get("init") == "hidden" and r["start_layer"] == 2
                and r["gate_lr_ratio"] == TrainConfig().gate_lr_ratio}
    assert by_scale[2.0]["heldout_loss"] != by_scale[SFTRunConfig().prefix_init_scale]["heldout_loss"]
    sweep = dict(aligners=["2:hidden"], aligner_lrs=[0.05], lora_lrs=[], prefix_lrs=[], resume=True)
    with pytest.raises(quality.BenchmarkError, match="other settings"):
        quality.main(**{**common, "steps": 4}, **sweep)
    # a results file from before --min-lr-ratio (no such setting) was made with every cosine ending at 0, and from
    # before the shuffled batch order with each run of batches longest to shortest
    older = json.loads(out.read_text())
    for name in ("min_lr_ratio", "max_norm", "shuffle_grouped_batches", "adam_beta1", "adam_beta2"):
        del older["settings"][name]  # (and before --adam-beta1/-beta2: AdamW at 0.9, 0.95)
    for r in older["runs"]:
        r.pop("rank", None)  # and before --lora-ranks: LoRA was r=8
    out.write_text(json.dumps(older))
    for bad, says in (({"min_lr_ratio": 0.5, "shuffle_grouped_batches": False, "adam_beta1": 0.9},
                       "--min-lr-ratio 0.0 \\(now 0.5\\)"),
                      ({"min_lr_ratio": 0.0, "adam_beta1": 0.9}, "--shuffle-grouped-batches False \\(now True\\)")):
        with pytest.raises(quality.BenchmarkError, match="other settings: " + says):
            quality.main(**common, **bad, **sweep)
    with pytest.raises(quality.BenchmarkError, match=f"--adam-beta1 0.9 \\(now {TrainConfig().adam_beta1}\\)"):
        quality.main(**common, min_lr_ratio=0.0, shuffle_grouped_batches=False, **sweep)
    first, common = common, dict(common, min_lr_ratio=0.0, shuffle_grouped_batches=False, adam_beta1=0.9)
    assert len(quality.main(**common, **sweep)["runs"]) == len(scaled["runs"])  # nothing reran
    with pytest.raises(quality.BenchmarkError, match="--min-lr-ratio must be in"):
        quality.main(**{**common, "min_lr_ratio": 2.0}, **sweep)
    # another LoRA rank joins the file (alpha 2 x rank); the ratios stay relative to r=8
    ranked = quality.main(**common, **{**sweep, "lora_lrs": [1e-2]}, lora_ranks=[2, 8])
    assert len(ranked["runs"]) == len(scaled["runs"]) + 1  # only r=2 ran: the r=8 run (no "rank" key) is kept
    by_label = {r["label"]: r for r in ranked["runs"] if r["system"] == "lora"}
    assert by_label["LoRA r=2 (q, v)"]["trainable_params"] == 4 * (2 * 64 + 64 * 2 + 2 * 64 + 32 * 2)
    assert by_label["LoRA r=8 (q, v)"]["x_lora_loss"] == 1.0
    assert by_label["LoRA r=2 (q, v)"]["heldout_loss"] != lora["heldout_loss"]
    # --max-norm clips every system's gradients alike (a bound below every norm: each trains to another loss), and
    # --adam-beta1/-beta2 set every system's AdamW
    for name, flags in (("clipped", dict(max_norm=1e-3)), ("betas", dict(adam_beta1=0.5, adam_beta2=0.99))):
        changed = quality.main(**{**first, "out": tmp_path / f"{name}.json"}, **flags, aligners=["2:hidden"],
                               aligner_lrs=[0.05], paper=False, lora_lrs=[1e-2], prefix_lrs=[])
        assert all(changed["settings"][k] == v for k, v in flags.items())
        again = {(r["label"], r.get("init")): r for r in changed["runs"]}
        for key in (("Aligner N=2", "hidden"), ("LoRA r=8 (q, v)", None)):
            assert again[key]["heldout_loss"] != runs[key]["heldout_loss"], (name, key)


def _worker_of(pid: int, marker: bytes = b"--_run-one-system") -> int:
    """The pid of a child of `pid` whose command line holds `marker` (by default the quality benchmark's child: one
    system's run), or 0."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes() and \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                return int(proc.name)
        except OSError:  # the process ended meanwhile
            continue
    return 0


def _stopped_with(bench: subprocess.Popen, child: int, timeout: float, case: str) -> str:
    """Wait for a signalled benchmark to end; its stderr. Fails if `child` (what it started) outlived it: such an
    orphan (a run of 10^6 steps, a server) is killed first, or it would hold the pipes open and run on after the
    test."""
    import os
    import signal

    try:
        _, err = bench.communicate(timeout=timeout)
    finally:
        outlived = Path(f"/proc/{child}").exists()
        if outlived:
            os.kill(child, signal.SIGKILL)
    assert not outlived, f"process {child} outlived the benchmark ({case})"
    return err


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` installed (Linux: SigCgt of /proc/PID/status)."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the child process through /proc")
def test_quality_benchmark_stopped_by_a_signal_says_so_and_keeps_finished_runs(tiny_checkpoint_dir, tmp_path):
    """A signal to one system's run (SIGTERM: the trainer stops at the end of its step) is one error line naming the
    run; Ctrl-C on the whole benchmark, or SIGTERM to the benchmark alone (`kill`, `timeout`), says how to go on and
    stops the running system too (no orphan left training); none prints a traceback, and the finished runs stay in the
    results file for --resume."""
    import os
    import signal
    import time

    pytest.importorskip("peft")
    from lit_aligner.data import default as default_data

    data = tmp_path / "sft.json"
    data.write_text(json.dumps(default_data.generate_rows(80, seed=4)))
    out = tmp_path / "quality.json"
    command = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--checkpoint-dir", str(tiny_checkpoint_dir),
               "--data", str(data), "--template", "plain", "--max-seq-length", "128", "--heldout", "16",
               "--steps", "1000000", "--batch", "2", "--micro-batch", "2", "--warmup-steps", "1", "--aligners",
               "2:hidden", "--aligner-lrs", "0.05", "--lora-lrs", "--prefix-lrs", "--device", "cpu", "--threads", "1",
               "--out", str(out)]

    def stop(signum: int, target: str, resume: bool):
        # SIGINT as in a foreground terminal: a test run started in the background (`.ci/run &` from a script)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
        bench = subprocess.Popen(command + (["--resume"] if resume else []), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        worker = 0
        while time.monotonic() < deadline:  # until the Aligner's run is in its training loop (its handler is set)
            worker = _worker_of(bench.pid) if out.exists() else 0
            if worker and _catches(worker, signal.SIGTERM):
                break
            time.sleep(0.2)
        assert worker, "the Aligner run did not start"
        if target == "group":  # Ctrl-C in a terminal: every process of the foreground group
            os.killpg(bench.pid, signum)
        else:
            os.kill(worker if target == "worker" else bench.pid, signum)
        err = _stopped_with(bench, worker, timeout=120, case=f"signal {signum} to the {target}")
        assert "Traceback" not in err, err
        return bench.returncode, err

    status, err = stop(signal.SIGTERM, "worker", resume=False)
    assert status == 1
    assert "error: the Aligner N=2 run was stopped by SIGTERM after step" in err
    assert "error: the Aligner N=2 run failed (exit status 1)" in err
    assert [r["system"] for r in json.loads(out.read_text())["runs"]] == ["base"]

    for signum, target in ((signal.SIGINT, "group"), (signal.SIGTERM, "benchmark")):
        status, err = stop(signum, target, resume=True)
        assert status == 130, (target, err)
        assert f"interrupted during the Aligner N=2 run; the 1 finished run(s) are in {out}" in err
        assert [r["system"] for r in json.loads(out.read_text())["runs"]] == ["base"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the server process through /proc")
def test_serve_benchmark_stopped_by_sigterm_stops_its_server(tiny_checkpoint_dir, tmp_path):
    """SIGTERM to the serving benchmark (`kill`, `timeout`), while its server starts and while it answers, ends the
    benchmark as Ctrl-C does: the server process stops with it and the temporary files go."""
    import os
    import signal
    import time
    import urllib.request

    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    command = [sys.executable, str(REPO / "benchmarks" / "serve.py"), "--checkpoint-dir", str(tiny_checkpoint_dir),
               "--clients", "2", "--requests-per-client", "100000", "--max-tokens", "4", "--aligners", "2",
               "--n-tokens", "2", "--max-batch", "2", "--device", "cpu", "--no-peer", "--long-prompt-tokens", "0",
               "--system-prompt-tokens", "0", "--out", str(tmp_path / "serve.json")]
    for when in ("starting", "answering"):
        bench = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "TMPDIR": str(tmp)}, start_new_session=True)
        server, deadline = 0, time.monotonic() + 120
        while not server and time.monotonic() < deadline:
            server = _worker_of(bench.pid, b"lit_aligner.serving")
            time.sleep(0.05)
        assert server, "the server did not start"
        if when == "answering":  # its /health answers: the benchmark is inside `with ServerProcess(...)`
            argv = (Path("/proc") / str(server) / "cmdline").read_bytes().split(b"\0")
            health = f"http://127.0.0.1:{int(argv[argv.index(b'--port') + 1])}/health"
            while time.monotonic() < deadline:
                try:
                    if urllib.request.urlopen(health, timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.2)
        os.kill(bench.pid, signal.SIGTERM)
        err = _stopped_with(bench, server, timeout=60, case=f"stopped while {when}")
        assert bench.returncode == 130 and "Traceback" not in err, (when, err)
        assert list(tmp.iterdir()) == [], when  # the Aligners' folder and the server's log


def test_on_policy_distillation_rows_beside_trls_sdft_trainer(tmp_path):
    payload = load_script("train").main(config="tiny", batch=2, seq_len=16, mode=("distill",), warmup=1, steps=2,
                                        device="cpu", threads=1, out=tmp_path / "t.json")
    rows = {(r["system"], r["mode"]): r for r in payload["results"]}
    ours, peer = rows["Aligner (lit-aligner)", "distill"], rows["LoRA r=8 (PEFT, TRL SDFTTrainer)", "distill"]
    # both students start as the base, which the context moves the teacher away from: a positive divergence
    assert ours["loss"] > 0 and peer["first_loss"] > 0 and math.isfinite(ours["loss"])
    assert ours["vs_lora"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
    assert ours["mfu"] is None and ours["trainable_params"] < peer["trainable_params"]
    assert payload["peers"] == ["LoRA r=8 (PEFT, TRL SDFTTrainer)"] and "trl" in payload["peer_versions"]


def test_grpo_rows_beside_trls_grpo_trainer(tmp_path):
    payload = load_script("train").main(config="tiny", batch=4, seq_len=16, mode=("grpo",), num_generations=2,
                                        warmup=1, steps=2, device="cpu", threads=1, out=tmp_path / "t.json")
    rows = {(r["system"], r["mode"]): r for r in payload["results"]}
    ours, peer = rows["Aligner (lit-aligner)", "grpo"], rows["LoRA r=8 (PEFT, TRL GRPOTrainer)", "grpo"]
    # one reward function for both, read from each one's decoded answers: a share of even token ids, strictly between
    # 0 and 1 over 2 x 2 random answers of 12 tokens
    assert 0 < ours["reward"] < 1 and 0 < peer["reward"] < 1
    assert ours["vs_lora"] == pytest.approx(ours["tokens_per_s"] / peer["tokens_per_s"])
    assert ours["mfu"] is None and ours["trainable_params"] < peer["trainable_params"]
    assert payload["num_generations"] == 2 and payload["peers"] == ["LoRA r=8 (PEFT, TRL GRPOTrainer)"]


def test_grpo_rows_need_a_batch_of_whole_groups(tmp_path):
    module = load_script("train")
    with pytest.raises(module.BenchmarkError, match="multiple of it"):
        module.main(config="tiny", batch=4, seq_len=16, mode=("grpo",), num_generations=3,
                                  out=tmp_path / "t.json")
