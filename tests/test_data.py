"""Data formats, strict validation, --skip_invalid_records, sources/ratios and the --dry_run report.

Many small cases run in-process (read_json_records, normalize_record, build_dataset); three real
subprocess runs of finetune.py cover what a user sees: a strict validation failure, a dry run without
model weights, and a short training run on the Glaive tool-calling demo with Qwen2.5's template."""

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

import finetune as ft
import finetune_data as fd
import finetune_report as fr
from conftest import SHARED, read_log_history, run_finetune, write_jsonl

QWEN25 = SHARED / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
GLAIVE = SHARED / "data" / "glaive_toolcall_en_demo.json"


def chat(q="What is 2+2?", a="4", **extra):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def records(path):
    return [(line, r if not isinstance(r, ft.RecordError) else f"ERROR {r}") for line, r in fd.read_json_records(path)]


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------


def test_jsonl_bom_crlf_blank_lines_and_bad_lines_in_a_large_file(tmp_path):
    lines = [json.dumps(chat(f"q{i}")) for i in range(3000)]
    lines[1233] = '{"messages": [oops'          # line 1235 of the file (a BOM+blank line come first)
    lines[2998] = '{"messages": []} trailing'   # line 3000
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\xef\xbb\xbf\r\n" + "\r\n".join(lines).encode() + b"\r\n\r\n")
    got = records(str(path))
    assert len(got) == 3000
    errors = [(line, r) for line, r in got if isinstance(r, str)]
    assert [line for line, _ in errors] == [1235, 3000]
    assert all(r.startswith("ERROR json: invalid JSON") for _, r in errors)
    assert got[0] == (2, chat("q0")) and got[-1] == (3001, chat("q2999"))


def test_json_array_line_numbers_gzip_and_bad_utf8(tmp_path):
    items = [chat(f"q{i}") for i in range(5)]
    text = "\n\n" + json.dumps(items, indent=2)  # each record spans 12 lines; '[' is on line 3
    (tmp_path / "a.json").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "a.json.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    for name in ("a.json", "a.json.gz"):
        got = records(str(tmp_path / name))
        assert got == [(4 + 12 * i, items[i]) for i in range(5)]
    # a broken element: reported at its own line, records before it are kept
    broken = text.replace('"q3"', '"q3",,', 1)
    (tmp_path / "b.json").write_text(broken, encoding="utf-8")
    got = records(str(tmp_path / "b.json"))
    assert [r for _, r in got[:3]] == items[:3]
    line_of_q3 = broken.count("\n", 0, broken.index('"q3"')) + 1
    assert got[3][0] == line_of_q3 and got[3][1].startswith("ERROR json: invalid JSON")
    (tmp_path / "c.jsonl").write_bytes(json.dumps(chat()).encode() + b"\n" + b'{"x": "\xff"}\n')
    assert records(str(tmp_path / "c.jsonl"))[1] == (2, "ERROR json: not valid UTF-8")


# ------------------------------------------------------------------------------------------------
# Formats
# ------------------------------------------------------------------------------------------------

CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_SCHEMA = {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {}}}


def test_every_format_normalizes_to_messages():
    openai = {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny.", "train": True}],
        "tools": [{"type": "function", "function": TOOL_SCHEMA}]}
    sharegpt = {"conversations": [
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}],
        "system": "Be brief.", "tools": json.dumps([TOOL_SCHEMA])}
    alpaca = {"instruction": "Translate", "input": "Bonjour", "output": "Hello", "system": "Be brief.",
              "history": [["Hi", "Hello!"]]}
    rounds = {"chat_rounds": [{"role": "system", "content": "Be brief."}, {"role": "human", "content": "Hi"},
                              {"role": "bot", "content": "Hello!"}]}
    assert [fd.detect_format(r) for r in (openai, sharegpt, alpaca, rounds)] == [
        "messages", "sharegpt", "alpaca", "chat_rounds"]

    msgs, tools = fd.normalize_record(openai, "messages")
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[2]["content"] == "" and msgs[2]["tool_calls"] == [{**CALL, "id": "c1"}]  # arguments: a dict
    assert msgs[3] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert tools == [{"type": "function", "function": TOOL_SCHEMA}]

    msgs, tools = fd.normalize_record(sharegpt, "sharegpt")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    assert msgs[2]["tool_calls"] == [CALL]
    assert tools == [{"type": "function", "function": TOOL_SCHEMA}]

    msgs, tools = fd.normalize_record(alpaca, "alpaca")
    assert msgs == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Translate\nBonjour"},
                    {"role": "assistant", "content": "Hello"}]
    msgs, _ = fd.normalize_record(rounds, "chat_rounds")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record,fmt,expected", [
    ({"messages": []}, "messages", "messages: must be a non-empty list"),
    ({"messages": "hi"}, "messages", "messages: must be a non-empty list"),
    ({"prompt": "x"}, "messages", "messages: missing (file read as messages format)"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "messages",
     "messages[0].content: content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "messages",
     "messages[1].content: missing"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "messages",
     "messages[1].content: empty assistant reply"),
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "messages: no assistant turn to train on"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]},
     "messages", "messages: every assistant turn is excluded"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": "no"}]},
     "messages", "messages[1].train: must be true or false"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "image"}]}]},
     "messages", "messages[1].content: multimodal content (images)"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}, "sharegpt",
     "conversations[1].from: unknown speaker 'robot'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]}, "sharegpt",
     "conversations[1].value: missing or null"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "[{"},
     "sharegpt", "tools: not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}, "sharegpt",
     "conversations[1].value: each tool call needs a function name"),
    ({"instruction": "q"}, "alpaca", "output: missing or not a string"),
    ({"instruction": "q", "input": 3, "output": "a"}, "alpaca", "input: must be a string"),
    ({"instruction": "q", "output": ""}, "alpaca", "output: empty assistant reply"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "alpaca", "history[0]: must be a"),
    ({"chat_rounds": [{"role": "human", "content": "q"}]}, "chat_rounds", "chat_rounds: no assistant turn"),
    (["not", "an", "object"], "messages", "record: must be a JSON object, got list"),
])
def test_invalid_records_name_field_and_problem(record, fmt, expected):
    with pytest.raises(ft.RecordError) as e:
        fd.normalize_record(record, fmt)
    assert str(e.value).startswith(expected), str(e.value)


# ------------------------------------------------------------------------------------------------
# build_dataset in-process: sources, ratios, report counts
# ------------------------------------------------------------------------------------------------


def build(tiny_model, tmp_path, spec, *flags, template=None):
    margs, dargs, targs, _ = ft.parse_args(["--model_name_or_path", tiny_model, "--data_path", spec,
                                           "--output_dir", str(tmp_path / "out"), *flags])
    if template:
        margs.chat_template = str(template)
    tok = ft.load_tokenizer(margs, targs)
    path = ft.build_dataset(spec, tok, dargs, targs, str(tmp_path / "cache"))
    import datasets

    with open(Path(path) / "report.json") as f:
        return datasets.load_from_disk(str(Path(path) / "data")), json.load(f), tok


def test_sources_ratios_and_report_counts(tiny_model, tmp_path):
    data = tmp_path / "data"
    # a folder of MFTCoder tasks: one sub-folder per task -> source = task name
    write_jsonl(data / "tasks" / "code" / "part1.jsonl",
                [{"chat_rounds": [{"role": "human", "content": f"c{i}"}, {"role": "bot", "content": "ok"}]}
                 for i in range(4)])
    write_jsonl(data / "tasks" / "math" / "part1.jsonl",
                [{"chat_rounds": [{"role": "user", "content": f"m{i}"}, {"role": "assistant", "content": "2"}]}
                 for i in range(6)])
    # messages with a per-record source, one invalid line, one blank line, one overlong record
    write_jsonl(data / "mixed.jsonl", [chat("a", source="greetings"), chat("b"), "", '{"messages": [', chat("c"),
                                       chat("long " * 400, "x"), chat("d", "e", source="greetings")])
    spec = f"{data / 'tasks'},{data / 'mixed.jsonl'}:2"
    ds, report, _ = build(tiny_model, tmp_path, spec, "--skip_invalid_records", "True",
                          "--model_max_length", "128")
    files = report["files"]
    assert files[str(data / "tasks" / "code" / "part1.jsonl")] == {
        "records": 4, "invalid": 0, "samples": 4, "truncated": 0, "dropped": 0, "format": "chat_rounds"}
    assert files[str(data / "mixed.jsonl")] == {
        "records": 6, "invalid": 1, "samples": 4, "truncated": 0, "dropped": 1, "format": "messages"}
    assert report["records"] == 16 and report["records_valid"] == 15
    assert report["invalid"] == {"json: invalid JSON": 1}
    assert report["dropped"] == {"prompt_longer_than_model_max_length": 1}
    assert report["samples_before_ratio"] == 14 and report["samples"] == 4 + 6 + 2 * 4 == len(ds)
    assert report["samples_per_source"] == {"code": 4, "math": 6, "greetings": 4, "mixed": 4}
    assert sorted(report["sources"]) == report["sources"] == ["code", "greetings", "math", "mixed"]
    assert min(ds["n_trained"]) > 0 and max(ds["length"]) <= 128

    # ratio < 1 takes a subset of that entry only
    _, report, _ = build(tiny_model, tmp_path, f"{data / 'tasks'}:0.5,{data / 'mixed.jsonl'}",
                         "--skip_invalid_records", "True", "--model_max_length", "128")
    assert report["samples"] == 5 + 4


def test_template_refusals_are_counted_per_file_when_skipped(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "sys.jsonl", [
        {"messages": [{"role": "system", "content": "s"}, *chat()["messages"]]}, chat(), chat("x", "y")])
    _, report, _ = build(tiny_model, tmp_path, path, "--skip_invalid_records", "True",
                         template=SHARED / "templates" / "google-gemma-2-2b-it.jinja")
    assert report["files"][path]["invalid"] == 1 and report["files"][path]["samples"] == 2
    assert report["invalid"] == {"messages: the chat template refuses this conversation: System role not supported": 1}
    assert report["records_valid"] == 2 and report["samples"] == 2


def test_glaive_tool_calls_are_trained_with_qwen25_template(tiny_model, tmp_path):
    ds, report, tok = build(tiny_model, tmp_path, f"{GLAIVE}:0.1", "--model_max_length", "4096", template=QWEN25)
    assert report["files"][str(GLAIVE)]["records"] == 300 and report["files"][str(GLAIVE)]["format"] == "sharegpt"
    trained = [tok.decode([t for t in labels if t != ft.IGNORE_INDEX]) for labels in ds["labels"]]
    calls = [t for t in trained if "<tool_call>" in t]
    assert calls and all('{"name": ' in t and "</tool_call><|im_end|>" in t for t in calls)
    assert not any("<tool_response>" in t or "<|im_start|>" in t or "# Tools" in t for t in trained)


# ------------------------------------------------------------------------------------------------
# Real runs of finetune.py
# ------------------------------------------------------------------------------------------------


def test_invalid_data_stops_before_anything_with_file_line_field_problem(tiny_model, tmp_path):
    good = [json.dumps(chat(f"q{i}")) for i in range(40)]
    lines = good[:10] + ['{"messages": [{"role": "narrator", "content": "x"}]}'] + good[10:25] + \
        ['{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}'] + good[25:] + \
        ["{not json"]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    alp = tmp_path / "alpaca.json"
    alp.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}], indent=1))
    out = tmp_path / "out"
    proc = run_finetune(["--model_name_or_path", tiny_model, "--data_path", f"{path},{alp}", "--output_dir", out,
                         "--dataset_cache_dir", tmp_path / "cache", "--max_steps", "1"], check=False)
    assert proc.returncode != 0
    reported = re.findall(r"^(\S+?):(\d+): ([\w\[\].]+): (.+)$", proc.stdout, re.M)
    assert [(f, int(n), field) for f, n, field, _ in reported] == [
        (path, 11, "messages[0].role"), (path, 27, "messages[1].content"), (path, 43, "json"),
        (str(alp), 6, "output")], proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout
    assert not out.exists()  # nothing was created: no model loaded, no output directory


def test_dry_run_without_weights_writes_the_report(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").unlink()  # a dry run must never read weights
    data = write_jsonl(tmp_path / "d" / "chat.jsonl", [chat(f"q{i}", "answer " * (i % 5 + 1)) for i in range(20)]
                       + ['{"messages": [{"role": "user", "content": "q"}]}'])
    out = tmp_path / "out"
    run_finetune(["--model_name_or_path", model, "--data_path", f"{data},{SHARED / 'data' / 'identity.json'}:0.5",
                  "--output_dir", out, "--dataset_cache_dir", tmp_path / "cache", "--dry_run", "True",
                  "--skip_invalid_records", "True", "--per_device_train_batch_size", "4",
                  "--gradient_accumulation_steps", "2", "--dry_run_world_size", "2", "--use_lora", "True"])
    report = json.loads((out / "data_report.json").read_text())
    train = report["train"]
    identity = str(SHARED / "data" / "identity.json")
    assert train["files"][data]["records"] == 21 and train["files"][data]["invalid"] == 1
    assert train["files"][identity]["records"] == 91 and train["files"][identity]["format"] == "alpaca"
    assert train["invalid"] == {"messages: no assistant turn to train on": 1}
    assert train["samples"] == 20 + round(91 * 0.5)
    assert train["samples_per_source"] == {"chat": 20, "identity": 46}
    tokens = train["tokens"]
    assert tokens["samples"] == train["samples"] and 0 < tokens["trained_tokens"] < tokens["tokens"]
    assert tokens["p50"] <= tokens["p90"] <= tokens["p99"] <= tokens["max"]
    assert 0 <= train["padding_share"] < 1
    assert report["world_size"] == 2 and report["global_batch_size"] == 16
    assert report["steps_per_epoch"] == -(-train["samples"] // 16)
    mem = report["memory_estimate"]
    assert mem["method"] == "lora" and mem["per_device_micro_batch_tokens"] == 4 * tokens["max"]
    grid = mem["total_gb_by_method_and_zero_stage"]
    assert set(grid) == {"full", "lora", "q-lora"} and grid["q-lora"]["zero3"] is None
    assert not (out / "model.safetensors").exists()


def test_estimate_memory_gb_formula(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_size, config.intermediate_size, config.vocab_size = 1024, 2816, 32000
    full = fr.estimate_memory_gb(config, "full", 0, 1, 2048, 2, 64, False)
    gib = 1024 ** 3
    assert full["weights"] == round(full["params"] * 2 / gib, 3)
    assert full["optimizer"] == round(full["params"] * 12 / gib, 3)
    z3 = fr.estimate_memory_gb(config, "full", 3, 8, 2048, 2, 64, False)
    assert z3["weights"] == round(full["params"] * 2 / 8 / gib, 3) and z3["total_gb"] < full["total_gb"]
    lora = fr.estimate_memory_gb(config, "lora", 0, 1, 2048, 2, 64, False)
    qlora = fr.estimate_memory_gb(config, "q-lora", 0, 1, 2048, 2, 64, False)
    assert lora["trainable_params"] < full["params"] and qlora["weights"] < lora["weights"] < full["total_gb"]
    ckpt = fr.estimate_memory_gb(config, "full", 0, 1, 2048, 2, 64, True)
    assert ckpt["activations"] < full["activations"]


def test_glaive_tool_demo_trains(tiny_model, tmp_path):
    out = tmp_path / "out"
    run_finetune(["--model_name_or_path", tiny_model, "--data_path", f"{GLAIVE}:0.02", "--chat_template", QWEN25,
                  "--output_dir", out, "--dataset_cache_dir", tmp_path / "cache", "--max_steps", "2",
                  "--per_device_train_batch_size", "2", "--model_max_length", "2048", "--logging_steps", "1",
                  "--save_strategy", "no"])
    losses = [h["loss"] for h in read_log_history(out) if "loss" in h]
    assert len(losses) == 2 and all(0 < x < 100 for x in losses)
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["files"][str(GLAIVE)]["format"] == "sharegpt" and report["train"]["samples"] == 6
