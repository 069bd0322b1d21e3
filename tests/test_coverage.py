"""A chat template that drops part of a conversation is refused before training (finetune_coverage.py), and the
built-in chatml renders tools, tool calls and tool results (Qwen2.5 / Hermes convention).

Real templates (../shared/templates) on a real tokenizer (../shared/tokenizers/gpt-2) with real LLaMA-Factory data
(glaive_toolcall_en_demo.json: tool calls and `tools`; alpaca_en_demo.json: plain chats). A refusal is confirmed
independently of the check, TRL-style: the rendered text does not change when the dropped piece changes."""

import copy
import functools
import json
import re

import pytest
from transformers import AutoTokenizer

from conftest import SHARED, run_finetune
from finetune import tokenize_conversation
from finetune_coverage import TemplateDropsData
from finetune_data import normalize_record
from finetune_template import BUILTIN_TEMPLATES, CHATML_TEMPLATE
from test_masking import FAMILY, TEMPLATES, with_template

GLAIVE = json.loads((SHARED / "data" / "glaive_toolcall_en_demo.json").read_text(encoding="utf-8"))
ALPACA = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
# Templates that render tools, tool calls and tool results: glaive's tool conversations pass
RENDER_TOOLS = ["Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
                "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja",
                "meta-llama-Llama-3.2-3B-Instruct.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja",
                "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", "meetkai-functionary-medium-v3.1.jinja"]
# Templates that render no tool calls (or, DeepSeek-R1, only those of a turn whose content is null)
DROP_TOOLS = ["deepseek-llm-chat.jinja", "microsoft-Phi-3.5-mini-instruct.jinja",
              "ibm-granite-granite-3.3-2B-Instruct.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"]
WITH_CALLS = [k for k, r in enumerate(GLAIVE) if any(t["from"] == "function_call" for t in r["conversations"])]


@functools.lru_cache(maxsize=None)
def tokenizer(name):
    base = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "gpt-2")
    if name in FAMILY:
        return with_template(base, name)
    tok = copy.deepcopy(base)
    tok.chat_template = BUILTIN_TEMPLATES[name]
    return tok


def glaive(k):
    return normalize_record(GLAIVE[k], "sharegpt")


def outcome(name, messages, tools):
    """'ok', 'refused: ...' (the template raises), or 'drops: ...' (the check's refusal)."""
    try:
        tokenize_conversation(tokenizer(name), messages, 100000, tools=tools)
        return "ok"
    except TemplateDropsData as e:
        return f"drops: {e}"
    except ValueError as e:
        return f"refused: {e}"


def renders(name, messages, tools):
    return tokenizer(name).apply_chat_template(messages, tools=tools, tokenize=False)


@pytest.mark.parametrize("name", RENDER_TOOLS + ["chatml"])
def test_templates_that_render_tools_pass_glaive(name):
    results = [outcome(name, *glaive(k)) for k in WITH_CALLS[:12]]
    assert results == ["ok"] * len(results), results


@pytest.mark.parametrize("name", DROP_TOOLS)
def test_templates_that_drop_tool_calls_are_refused_and_really_drop_them(name):
    for k in WITH_CALLS[:6]:
        messages, tools = glaive(k)
        result = outcome(name, messages, tools)
        assert re.match(r"drops: (the tool call `\w+\(.*\)` of assistant turn \d+ \(message \d+\)|"
                        r"the tool schema `\w+`).* does not appear in the rendered text", result), result
        # independently: another function name in the call renders the same text
        i = next(i for i, m in enumerate(messages) if m.get("tool_calls"))
        call = messages[i]["tool_calls"][0]
        renamed = messages[:i] + [{**messages[i], "tool_calls": [{**call, "function": {
            **call["function"], "name": "zz_renamed"}}]}] + messages[i + 1:]
        assert renders(name, renamed, tools) == renders(name, messages, tools), name


@pytest.mark.parametrize("name", sorted(FAMILY) + ["chatml"])
def test_plain_data_passes_every_template(name):
    """alpaca_en_demo: a user turn and an answer. Hermes' tool-use template renders only with tools: given them."""
    tools = [{"type": "function", "function": {"name": "noop", "description": "Does nothing",
                                               "parameters": {"type": "object", "properties": {}}}}]
    results = [outcome(name, normalize_record(r, "alpaca")[0], tools if "Hermes" in name else None)
               for r in ALPACA[:15]]
    assert results == ["ok"] * len(results), results


def test_a_template_that_needs_tools_says_so():
    """Hermes-3's tool-use template fails on a chat without `tools` (it loops over them): the refusal says why and
    what to use instead. A template that fails for another reason gets no such hint."""
    chat = normalize_record(ALPACA[0], "alpaca")[0]
    result = outcome("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", chat, None)
    assert result.startswith("refused: ") and "it renders only with `tools`, and this record has none" in result, result
    assert "--chat_template chatml" in result
    llama2 = outcome("llama-2-chat.jinja", [{"role": "assistant", "content": "Hi"}, *chat], None)  # must alternate
    assert llama2.startswith("refused: ") and "`tools`" not in llama2, llama2


TOOL_CHAT = [
    {"role": "user", "content": "  Weather in Paris? \n"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "units": "celsius", "days": 3, "hourly": False}}}]},
    {"role": "tool", "content": '{"temp": 21,\n "summary": "sunny \\"and\\" warm"}'},
    {"role": "assistant", "content": "It is 21 degrees and sunny in Paris."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the user's weather",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "description": "City name"},
                                               "units": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                               "days": {"type": "integer"}, "hourly": {"type": "boolean"}}}}}]


@pytest.mark.parametrize("name", ["meta-llama-Llama-3.1-8B-Instruct.jinja", "meetkai-functionary-medium-v3.1.jinja",
                                  "mistralai-Mistral-Nemo-Instruct-2407.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja",
                                  "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja", "chatml"])
def test_reformatting_is_not_a_loss(name):
    """Trimmed content (Llama 3), a tool result written with tojson (Llama 3.1: escaped quotes and newlines),
    HTML-escaped schemas (functionary), arguments as JSON with other separators or key order, numbers and
    booleans, tool-call ids the data lacks (Mistral requires nine characters)."""
    assert outcome(name, TOOL_CHAT, TOOLS) == "ok"


def test_reasoning_of_earlier_turns_may_be_dropped_by_design_not_of_the_trained_last():
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "step one"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "reasoning_content": "step two"}]
    qwen3 = "Qwen-Qwen3-0.6B.jinja"
    assert "step one" not in renders(qwen3, chat, None)  # Qwen3 drops it from the earlier turn...
    assert outcome(qwen3, chat, None) == "ok"  # ... by design: it renders it when that turn is generated
    result = outcome("Qwen-Qwen2.5-7B-Instruct.jinja", chat, None)  # no reasoning at all
    assert result.startswith("drops: its reasoning of assistant turn 1 (message 2) does not appear in the rendered "
                             "text: the chat template never reads `reasoning_content`"), result
    assert outcome("chatml", chat, None) == "ok"


def test_each_kind_of_loss_is_caught_by_the_same_rule():
    """Qwen2.5's own template altered to drop one piece at a time: each is refused, naming it."""
    qwen = (TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text(encoding="utf-8")
    variants = {
        "the tool call `get_weather(city=\"Paris\", units=\"celsiu...)` (its `hourly`) of assistant turn 1 (message 3)":
            qwen.replace("tool_call.arguments | tojson", "dict(city=tool_call.arguments.city, units=tool_call."
                         "arguments.units, days=tool_call.arguments.days) | tojson"),
        "the tool schema `get_weather`": qwen.replace("{{- tool | tojson }}", "{{- tool.function.name }}"),
        "the tool result of message 4": qwen.replace("{{- message.content }}\n        {{- '\\n</tool_response>' }}",
                                                     "{{- '\\n</tool_response>' }}"),
        "the system message of message 1": qwen.replace("{{- messages[0]['content'] }}", ""),
    }
    system = [{"role": "system", "content": "You are a weather bot."}]
    for what, template in variants.items():
        assert template != qwen, what
        tok = copy.deepcopy(tokenizer("Qwen-Qwen2.5-7B-Instruct.jinja"))
        tok.chat_template = template
        with pytest.raises(TemplateDropsData) as e:
            tokenize_conversation(tok, system + TOOL_CHAT, 100000, tools=TOOLS)
        assert str(e.value).startswith(what), (what, str(e.value))
    assert outcome("Qwen-Qwen2.5-7B-Instruct.jinja", system + TOOL_CHAT, TOOLS) == "ok"


def test_builtin_chatml_renders_tools_as_qwen25_and_plain_chats_as_before():
    """The built-in chatml writes a tool conversation exactly as Qwen2.5's own template does (without Qwen's
    default system prompt), and a plain chat exactly as plain ChatML."""
    qwen = tokenizer("Qwen-Qwen2.5-7B-Instruct.jinja")
    chatml = tokenizer("chatml")
    default = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    for k in WITH_CALLS[:20]:
        messages, tools = glaive(k)
        want = qwen.apply_chat_template(messages, tools=tools, tokenize=False).replace(default + "\n\n", "", 1)
        assert chatml.apply_chat_template(messages, tools=tools, tokenize=False) == want
    plain = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}]
    assert chatml.apply_chat_template(plain, tokenize=False) == \
        "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    assert chatml.apply_chat_template(plain[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n")
    assert CHATML_TEMPLATE is BUILTIN_TEMPLATES["chatml"]


def glaive_entry(tmp_path):
    """LLaMA-Factory's data folder shape: dataset_info.json naming glaive_toolcall_en_demo (as LLaMA-Factory's own)."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "glaive_toolcall_en_demo.json").symlink_to(SHARED / "data" / "glaive_toolcall_en_demo.json")
    (folder / "dataset_info.json").write_text(json.dumps({"glaive_toolcall_en_demo": {
        "file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"}}}))
    return folder


def test_own_template_without_tools_is_refused_in_one_line(smollm2, tmp_path):
    """SmolLM2's own template renders only `content`: glaive is refused before any model is loaded, one line
    naming the first record, what it lost, how many records are affected and the fix; exit code 2, nothing in
    --output_dir. With --chat_template chatml the same data passes (--dry_run)."""
    common = ["--model_name_or_path", smollm2, "--dataset_dir", glaive_entry(tmp_path), "--dataset",
              "glaive_toolcall_en_demo", "--output_dir", tmp_path / "out", "--dataset_cache_dir", tmp_path / "cache",
              "--dry_run", "True"]
    proc = run_finetune(common, check=False)
    errors = [line for line in proc.stdout.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout
    assert re.fullmatch(
        r"\[finetune\] error: \S*glaive_toolcall_en_demo\.json:2: the tool call `search_recipes\(ingredients=.*\)` "
        r"of assistant turn 2 \(message 4\) does not appear in the rendered text: the chat template never reads "
        r"`tool_calls`; 191 of 300 records lose data this way \(tool call: 153, tools: 38\), nothing was trained\. "
        r"Fix: --chat_template chatml .*", errors[0]), errors[0]
    assert not (tmp_path / "out").exists()
    ok = run_finetune(common + ["--chat_template", "chatml"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["train"]["samples"] == 300, ok.stdout[-3000:]


def test_show_masking_trains_the_tool_call_not_the_result(smollm2, tmp_path):
    """--show_masking with the built-in chatml on SmolLM2: each <tool_call> JSON is trained with its <|im_end|>,
    the tools list and every <tool_response> are not."""
    out = run_finetune(["--model_name_or_path", smollm2, "--data_path",
                        SHARED / "data" / "glaive_toolcall_en_demo.json",
                        "--chat_template", "chatml", "--output_dir", tmp_path / "out", "--show_masking", 4,
                        "--dataset_cache_dir", tmp_path / "cache"]).stdout
    sample = out.split("----- sample 0 ")[1].split("----- sample 1 ")[0]
    assert ('[[<tool_call>\n{"name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", '
            '"rice"]}}\n</tool_call><|im_end|>]]') in sample, sample
    trained = "".join(re.findall(r"\[\[(.*?)\]\]", out, flags=re.S))
    untrained = re.sub(r"\[\[.*?\]\]", "", out, flags=re.S)
    assert "<tools>" in untrained and "<tool_response>" in untrained
    assert "<tools>" not in trained and "<tool_response>" not in trained
    result = '{"recipes": [{"name": "Chicken and Bell Pepper Stir Fry"'  # the first tool result
    assert result in untrained and result not in trained
