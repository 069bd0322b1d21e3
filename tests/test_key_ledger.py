"""Nothing the reader ignores (issue 33): every key of a record, top level and inside each message, is read, read
under another name, ignored by a documented rule, or reported; content is never dropped without a word.

The data files are tests/data/formats/, each written from its format's own public documentation (tests/data/README.md
says which): OpenAI's chat fine-tuning format (weight, name, legacy functions/function_call, role developer), Mistral's
fine-tuning format, gpt-oss's cookbook data (reasoning in `thinking`), vLLM's `reasoning`, DeepSeek's
`reasoning_content`. Real templates (../shared/templates) on a real tokenizer (../shared/tokenizers/gpt-2), the
built-in chatml, finetune.main() in-process for what a user sees (--dry_run, --show_masking), and SmolLM2's own
template, which renders neither names nor reasoning."""

import json
import re
from pathlib import Path

import pytest

import finetune as ft
import finetune_data as fd
from conftest import write_jsonl
from finetune_coverage import TemplateDropsData
from test_bad_input import dry_run_args, run_main, user_error
from test_coverage import tokenizer as template_tokenizer
from test_data_sources import build, write_parquet

FORMATS = Path(__file__).parent / "data" / "formats"
QWEN3, QWEN25 = "Qwen-Qwen3-0.6B.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja"


def records(name):
    return [json.loads(line) for line in (FORMATS / name).read_text(encoding="utf-8").splitlines()]


def messages_of(record, fmt="messages", **ledger):
    return fd.normalize_record(record, fmt, **ledger)


def tokenized(template, messages, tools=None, **flags):
    """(input_ids, labels) of one conversation on gpt-2 with this template (a file of ../shared/templates or chatml)."""
    ids, labels, status, _ = ft._tokenize_arrays(template_tokenizer(template), [(messages, tools)], 100000, **flags)[0]
    assert status == "", status
    return ids.tolist(), labels.tolist()


def trained(template, labels):
    """The trained text; gpt-2 has no <|im_end|> token, so its '>' may carry the newline after it: left out."""
    text = template_tokenizer(template).decode([t for t in labels if t != ft.IGNORE_INDEX])
    return text.replace("<|im_end|>\n", "<|im_end|>")


def report_of(tmp_path):
    return json.loads((tmp_path / "out" / "data_report.json").read_text())["train"]


# ------------------------------------------------------------------------------------------------
# Point 1: one ledger of keys, for every format and file kind
# ------------------------------------------------------------------------------------------------


def test_keys_no_format_reads_are_named_once_with_their_count_and_listed_in_the_report(tiny_model, tmp_path,
                                                                                         monkeypatch, capsys):
    """gpt-oss's cookbook data repeats each text in top-level columns (reasoning_language, developer, user, analysis,
    final): reported, once each, with the records that have them; ids and metadata are ignored by rule; the same
    rows as Parquet give the same ledger (one mechanism for JSON and tables)."""
    gpt_oss = records("gpt_oss_thinking.jsonl")
    with_ids = [{"id": f"r{i}", "metadata": {"split": "train"}, **r,
                 "messages": [{**m, "id": f"m{j}"} for j, m in enumerate(r["messages"])]}
                for i, r in enumerate(gpt_oss)]
    jsonl = write_jsonl(tmp_path / "gpt_oss.jsonl", with_ids)
    code, log = run_main(dry_run_args(tiny_model, jsonl, tmp_path, "--chat_template", "chatml"), monkeypatch, capsys)
    assert code == 0, log[-3000:]
    keys = report_of(tmp_path)["keys"]
    assert keys["not_read"] == {k: {"records": 2, "first": f"{jsonl}:1"}
                                for k in ("reasoning_language", "developer", "user", "analysis", "final")}
    assert set(keys["ignored"]) == {"id", "metadata", "messages[].id"}
    assert keys["read_as"] == {"messages[].thinking -> reasoning_content": {"records": 2, "first": f"{jsonl}:1"}}
    lines = [x for x in log.splitlines() if "keys no format reads" in x]
    assert len(lines) == 1 and "reasoning_language (2 records, first at" in lines[0] and "final (2 records)" in lines[0]
    assert "--columns NAME=KEY" in lines[0] and not any("id (" in x for x in log.splitlines())

    table = write_parquet(tmp_path / "gpt_oss.parquet", gpt_oss)
    code, log = run_main(dry_run_args(tiny_model, table, tmp_path, "--chat_template", "chatml"), monkeypatch, capsys)
    assert code == 0, log[-3000:]
    assert set(report_of(tmp_path)["keys"]["not_read"]) == {"reasoning_language", "developer", "user", "analysis",
                                                            "final"}


def test_content_nothing_reads_stops_the_run_in_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    """A key that holds content no template renders (OpenAI's assistant `refusal`; reasoning on a user message): the
    run stops before any model is loaded, one line per problem with file:line, the key, how many records have it
    (whatever message it is in) and the fix."""
    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "Tell me something harmful."},
                           {"role": "assistant", "content": "", "refusal": "I can't help."}][:2 + 2 * (i > 0)]}
             for i in range(4)]
    chats[0]["messages"][1]["refusal"] = "No."
    data = write_jsonl(tmp_path / "refusals.jsonl", chats)
    error = user_error(dry_run_args(tiny_model, data, tmp_path, "--chat_template", "chatml"), monkeypatch, capsys)
    assert re.search(rf"{re.escape(data)}:1: messages\[1\]\.refusal: an assistant's refusal text \(OpenAI\): "
                     r"nothing renders it; write it as the turn's content \(and 3 more records like it: 2, 3, 4\)",
                     error), error
    assert error.count("refusal:") == 1 and not (tmp_path / "out").exists()

    thoughtful = write_jsonl(tmp_path / "user_reasoning.jsonl", [{"messages": [
        {"role": "user", "content": "q", "reasoning": "why I ask"}, {"role": "assistant", "content": "a"}]}])
    error = user_error(dry_run_args(tiny_model, thoughtful, tmp_path), monkeypatch, capsys)
    assert "user_reasoning.jsonl:1: messages[0].reasoning_content: reasoning on a user message: only an assistant" \
           in error


def test_a_misspelt_key_is_refused_with_its_did_you_mean(tiny_model, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "typo.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_contnet": "r"}]}] * 2)
    error = user_error(dry_run_args(tiny_model, data, tmp_path), monkeypatch, capsys)
    assert ("typo.jsonl:1: messages[1].reasoning_contnet: unknown key (did you mean 'reasoning_content'?); fix "
            "the name, or map it with --columns reasoning_contnet=reasoning_content (and 1 more record like it: 2)"
            ) in error


# ------------------------------------------------------------------------------------------------
# Point 2: reasoning under any of its names; any message key mapped with --columns
# ------------------------------------------------------------------------------------------------

REASONING = "Compare the tenths: 9.8 has 8 tenths, 9.11 has 1 tenth, so 9.8 is greater."
ANSWER = "9.8 is greater than 9.11."


@pytest.mark.parametrize("form", ["deepseek_reasoning_content.jsonl", "vllm_reasoning.jsonl", "thinking",
                                  "llamafactory_v1_parts"])
def test_reasoning_under_any_name_is_the_turns_reasoning(form):
    (record,) = records("deepseek_reasoning_content.jsonl")
    if form == "thinking":  # gpt-oss's cookbook's key
        record = {"messages": [record["messages"][0], {"role": "assistant", "content": ANSWER, "thinking": REASONING}]}
    elif form == "llamafactory_v1_parts":
        record = {"messages": [record["messages"][0], {"role": "assistant", "content": [
            {"type": "reasoning", "value": REASONING}, {"type": "text", "value": ANSWER}]}]}
    elif form != "deepseek_reasoning_content.jsonl":
        (record,) = records(form)
    messages, _ = messages_of(record)
    assert messages[1] == {"role": "assistant", "content": ANSWER, "reasoning_content": REASONING}
    for template in ("chatml", QWEN3):  # rendered and trained where the template renders reasoning
        assert f"<think>\n{REASONING}\n</think>\n\n{ANSWER}" in trained(template, tokenized(template, messages)[1])
    with pytest.raises(TemplateDropsData, match="reasoning of assistant turn 1 .* never reads `reasoning_content`"):
        ft.tokenize_conversation(template_tokenizer(QWEN25), messages, 100000)  # renders no reasoning: refused


def test_smollm2_own_template_refuses_reasoning_it_would_drop(smollm2, tmp_path, monkeypatch, capsys):
    """SmolLM2's own template renders no reasoning: gpt-oss's `thinking` is refused in one line with the fix, and
    trained with --chat_template chatml."""
    data = str(FORMATS / "gpt_oss_thinking.jsonl")
    error = user_error(dry_run_args(smollm2, data, tmp_path), monkeypatch, capsys)
    assert re.fullmatch(rf"\[finetune\] error: {re.escape(data)}:1: its reasoning of assistant turn 1 \(message 3\) "
                        r"does not appear in the rendered text: the chat template never reads `reasoning_content`; "
                        r"2 of 2 records lose data this way \(reasoning: 2\), nothing was trained\. Fix: "
                        r"--chat_template chatml .*\n", error), error
    code, log = run_main(dry_run_args(smollm2, data, tmp_path, "--chat_template", "chatml"), monkeypatch, capsys)
    assert code == 0 and "messages[].thinking -> reasoning_content (2 records)" in log, log[-3000:]


def test_columns_maps_any_message_key_with_a_did_you_mean(tiny_model, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "cot.jsonl", [{"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER, "cot": REASONING}]}])
    code, log = run_main(dry_run_args(tiny_model, data, tmp_path, "--chat_template", "chatml"), monkeypatch, capsys)
    assert code == 0 and "messages[].cot (1 records" in log  # not read: said, with the flag that reads it
    args = dry_run_args(tiny_model, data, tmp_path, "--chat_template", "chatml", "--columns", "cot=reasoning_content")
    code, log = run_main(args, monkeypatch, capsys)
    assert code == 0 and f"[[<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>]]" in log, log[-3000:]
    assert report_of(tmp_path)["keys"] == {"read_as": {"messages[].cot -> reasoning_content (--columns)": {
        "records": 1, "first": f"{data}:1"}}}
    error = user_error(dry_run_args(tiny_model, data, tmp_path, "--columns", "cot=reasoning_contnet"), monkeypatch,
                       capsys)
    assert "--columns cot=reasoning_contnet: 'reasoning_contnet' is not a key of a format or of a message (did you " \
           "mean 'reasoning_content'?)" in error
    error = user_error(dry_run_args(tiny_model, data, tmp_path, "--columns", "thought=reasoning_content"), monkeypatch,
                       capsys)
    assert "--columns thought=reasoning_content: no data file has a column or key 'thought' (found: messages, " \
           "messages[].cot)" in error  # the keys it could have meant, the messages' own included


# ------------------------------------------------------------------------------------------------
# Point 3: --mask_reasoning keeps the reasoning in the context, out of the loss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["chatml", QWEN3])
def test_mask_reasoning_trains_the_answer_not_the_reasoning(template):
    messages, _ = messages_of(records("deepseek_reasoning_content.jsonl")[0])
    two_turns = messages + [{"role": "user", "content": "And 2.5 or 2.45?"},
                            {"role": "assistant", "content": "2.5 is greater.", "reasoning_content": "5 tenths > 4."}]
    ids, labels = tokenized(template, two_turns)
    masked_ids, masked = tokenized(template, two_turns, mask_reasoning=True)
    assert masked_ids == ids  # the same text: the reasoning stays in the context
    text = template_tokenizer(template).decode(ids)
    assert "<think>\n5 tenths > 4.\n</think>" in text and trained(template, labels).count("<think>") == (
        2 if template == "chatml" else 1)  # Qwen3 drops the reasoning of turns before the last question, by design
    assert trained(template, masked) == f"{ANSWER}<|im_end|>2.5 is greater.<|im_end|>"


def test_show_masking_shows_the_reasoning_out_of_the_loss(tiny_model, tmp_path, monkeypatch, capsys):
    args = dry_run_args(tiny_model, str(FORMATS / "vllm_reasoning.jsonl"), tmp_path, "--chat_template", "chatml",
                        "--show_masking", 1)
    code, log = run_main(args + ["--mask_reasoning", "True"], monkeypatch, capsys)
    assert code == 0, log[-3000:]
    assert f"<|im_start|>assistant\n<think>\n{REASONING}\n</think>\n\n[[{ANSWER}<|im_end|>]]" in log
    code, log = run_main(args, monkeypatch, capsys)  # the default: the reasoning is trained
    assert code == 0 and f"<|im_start|>assistant\n[[<think>\n{REASONING}\n</think>\n\n{ANSWER}<|im_end|>]]" in log


# ------------------------------------------------------------------------------------------------
# Point 4: OpenAI's legacy function calling is converted; mixing old and new forms is refused
# ------------------------------------------------------------------------------------------------


def test_legacy_function_calling_trains_what_tools_train(tiny_model, tmp_path):
    legacy, _, tok, _ = build(tiny_model, tmp_path, str(FORMATS / "openai_legacy_functions.jsonl"), template="chatml")
    tools, _, _, _ = build(tiny_model, tmp_path, str(FORMATS / "openai_tools.jsonl"), template="chatml",
                           cache="cache2")
    assert legacy["input_ids"] == tools["input_ids"] and legacy["labels"] == tools["labels"]
    text = tok.decode([t for t in legacy["labels"][1] if t != ft.IGNORE_INDEX])
    assert text.startswith('Let me look that up.\n<tool_call>\n{"name": "get_current_weather", "arguments": '
                           '{"location": "Paris, France", "format": "celsius"}}\n</tool_call><|im_end|>')  # text + call
    assert '"name": "get_current_weather", "description": "Get the current weather"' in tok.decode(
        legacy["input_ids"][0])  # `functions` became the tools the template lists


@pytest.mark.parametrize("mix, where", [
    (lambda r: {**r, "tools": [{"type": "function", "function": r["functions"][0]}]}, "functions"),
    (lambda r: {**r, "functions": None, "tools": [{"type": "function", "function": r["functions"][0]}],
                "messages": r["messages"][:1] + [{**r["messages"][1], "tool_calls": [
                    {"type": "function", "function": r["messages"][1]["function_call"]}]}]},
     "messages[1].function_call"),
    (lambda r: {**r, "messages": r["messages"][:2] + [{**r["messages"][2], "role": "tool"}] + r["messages"][3:]},
     "functions"),
])
def test_mixing_legacy_and_new_function_calling_is_refused_with_the_fix(mix, where):
    record = mix(records("openai_legacy_functions.jsonl")[1])
    with pytest.raises(fd.RecordError) as e:
        messages_of(record)
    assert e.value.field_name == where, e.value
    assert "functions -> tools, function_call -> tool_calls, role function -> role tool" in str(e.value) or \
           "write every call as tool_calls" in str(e.value) or "write every schema under tools" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Point 5: `name` is rendered or refused; role developer is system
# ------------------------------------------------------------------------------------------------


def test_names_are_rendered_by_chatml_and_refused_where_the_template_drops_them():
    record = records("openai_names.jsonl")[0]
    messages, _ = messages_of(record)
    ids, labels = tokenized("chatml", messages)
    text = template_tokenizer("chatml").decode(ids)
    assert "<|im_start|>system name=example_user\nNew synergies will help drive top-line growth.<|im_end|>" in text
    assert trained("chatml", labels) == ("This sudden change means we don't have time to do everything for the client "
                                         "project.<|im_end|>")
    with pytest.raises(TemplateDropsData, match=r"the speaker name `example_user` of the system message 2 does not "
                                                r"appear in the rendered text"):
        ft.tokenize_conversation(template_tokenizer(QWEN25), messages, 100000)
    merged, _ = messages_of(record, names="content")
    assert "<|im_start|>system\nexample_user: New synergies" in template_tokenizer(QWEN25).decode(
        tokenized(QWEN25, merged)[0])
    dropped, _ = messages_of(record, names="drop")
    assert "example_user" not in template_tokenizer(QWEN25).decode(tokenized(QWEN25, dropped)[0])


def test_own_template_without_names_says_the_fix_and_developer_is_system_once(smollm2, tmp_path, monkeypatch,
                                                                              capsys):
    data = str(FORMATS / "openai_names.jsonl")
    error = user_error(dry_run_args(smollm2, data, tmp_path), monkeypatch, capsys)
    assert re.fullmatch(rf"\[finetune\] error: {re.escape(data)}:1: the speaker name `example_user` of the system "
                        r"message 2 does not appear in the rendered text: the chat template never reads "
                        r"`message.name`; 1 of 1 records lose data this way \(name: 1\), nothing was trained\. Fix: "
                        r"--message_names content .* or --message_names drop; or --chat_template chatml .*\n", error)
    code, log = run_main(dry_run_args(smollm2, data, tmp_path, "--message_names", "content"), monkeypatch, capsys)
    assert code == 0 and "<|im_start|>system\nexample_assistant: Things working well together" in log, log[-3000:]
    assert log.count("role developer -> system (1 records)") == 1
    assert "<|im_start|>system\nYou are a helpful, pattern-following assistant" in log


# ------------------------------------------------------------------------------------------------
# What was right stays right
# ------------------------------------------------------------------------------------------------


def test_weights_mistral_hermes_and_inline_think_stay_right(tiny_model, tmp_path):
    """OpenAI's and Mistral's `weight` 0 is not trained, Mistral's tool calls with their ids are; ShareGPT's per-turn
    weight; Hermes' function-calling text and Qwen3's inline <think> are content, trained as written."""
    openai, _, tok, _ = build(tiny_model, tmp_path, str(FORMATS / "openai_weight.jsonl"), template="chatml")
    assert [tok.decode([t for t in labels if t != ft.IGNORE_INDEX]) for labels in openai["labels"]] == [
        "Paris, as if everyone doesn't know that already.<|im_end|>",
        "Oh, just some guy named William Shakespeare. Ever heard of him?<|im_end|>"]
    mistral, report, _, _ = build(tiny_model, tmp_path, str(FORMATS / "mistral.jsonl"), template="chatml",
                                  cache="cache2")
    first, second = (tok.decode([t for t in labels if t != ft.IGNORE_INDEX]) for labels in mistral["labels"])
    assert "n°2 contained in document n°2" not in first and first.count("<|im_end|>") == 2
    assert second.count('{"name": "generate_anagram", "arguments": {"word": ') == 2 and report["keys"] == {}
    sharegpt = {"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1", "weight": 0},
                                  {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert [m.get("loss_weight", 1) for m in messages_of(sharegpt, "sharegpt")[0]] == [1, 0, 1, 1]
    hermes = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    think = "<think>\nreason\n</think>\n\nanswer"
    for content in (hermes, think):
        messages, _ = messages_of({"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": content}]})
        assert messages[1] == {"role": "assistant", "content": content}
        assert trained(QWEN3, tokenized(QWEN3, messages)[1]).startswith(content)
