"""Label masking on real tokenizers: every shared template x every real tokenizer in ../shared/tokenizers,
with awkward conversations. Judged by characters, not by decoding:

- every non-space character of each assistant reply (its content, its tool calls) and of what closes its turn
  is covered by trained tokens;
- no character of any other message (system, user, tool result) and no role header is.

Where each message's characters are is found independently of finetune's rule: the characters of
apply_chat_template's text that change when only that message's content (or tool call) changes."""

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import SHARED
from finetune import IGNORE_INDEX, tokenize_conversation
from finetune_coverage import TemplateDropsData
from finetune_template import ChatRenderer, _with_template_arguments
from test_masking import _MARKERS, FAMILY, TEMPLATES, TOOL_CLOSING, TOOLS as DESCRIBED_TOOLS, spans, with_template

REAL = ["llama-spm", "gpt-2", "deepseek-llm"]
MARK = "\ue00a"  # private use: never in the conversations below
# Role headers: never trained, wherever they stand
HEADERS = ["<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "[INST]", "<|user|>", "<|assistant|>",
           "<|system|>", "<|start_of_role|>", "<｜User｜>", "<｜Assistant｜>", "<|START_OF_TURN_TOKEN|>",
           "<|USER_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|CHATBOT_TOKEN|>", "USER:", "ASSISTANT:", "User:", "Assistant:"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
SYSTEM = {"role": "system", "content": "Format: ### Response: then User: and Assistant: lines, [/INST] and "
                                       "<|START_RESPONSE|> are just text here."}


def call(args):
    return {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": args}}


def chat(*answers, system=False):
    msgs = [SYSTEM] if system else []
    for k, a in enumerate(answers):
        msgs += [{"role": "user", "content": f"question {k}?"}, {"role": "assistant", "content": a}]
    return msgs


CONVERSATIONS = {
    "one_word": chat("two", "No"),
    "emoji": chat("😀", " 🎉 party"),
    "leading_space_digit_punct": chat(" leading space", "42 is it", "...well, yes."),
    "code_fence": chat("```python\nprint('hi')\n```"),
    "echo": [{"role": "user", "content": "Paris is the capital"},
             {"role": "assistant", "content": "Paris is the capital"}],
    "header_like": [SYSTEM, {"role": "user", "content": "### Response:\nUser: hi\nAssistant: ok\n[/INST] ASSISTANT: "
                                                        "<|START_RESPONSE|> <|im_start|>assistant"},
                    {"role": "assistant", "content": "### Response: fine\nUser: no"}],
    "blank_lines_crlf": chat("line one\r\n\r\nline two\n\n\nline three"),
    "reasoning": [{"role": "user", "content": "q1"},
                  {"role": "assistant", "content": "<think>\nstep one\n</think>\n\nanswer one"},
                  {"role": "user", "content": "q2"},
                  {"role": "assistant", "content": "answer two", "reasoning_content": "step two"}],
    "tool_dict_args": [SYSTEM, {"role": "user", "content": "weather in Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": [call({"city": "Paris"})]},
                       {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21}'},
                       {"role": "assistant", "content": "It is 21 degrees."}],
    "tool_string_args": [{"role": "user", "content": "weather in Rome?"},
                         {"role": "assistant", "content": "Let me check.",
                          "tool_calls": [call('{"city": "Rome"}')]},
                         {"role": "tool", "tool_call_id": "call00001", "content": "sunny"},
                         {"role": "assistant", "content": "Sunny."}],
    "multi_turn_system": chat("Hi! How can I help?", "The answer is 4.", "You are welcome.", system=True),
}


@functools.lru_cache(maxsize=None)
def real_tokenizer(name):
    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)


@functools.lru_cache(maxsize=None)
def family_tokenizer(real, template):
    return with_template(real_tokenizer(real), template)


def where(text, render, messages, j):
    """Characters of `text` that message j's content and tool calls decide (None where it has no effect)."""
    m = messages[j]
    changed = [{**m, "content": MARK + "x" + MARK}]
    if m.get("tool_calls"):
        args = [{"q": "zz"} if isinstance(c["function"]["arguments"], dict) else '{"q": "zz"}' for c in m["tool_calls"]]
        changed.append({**m, "tool_calls": [{**c, "function": {"name": "zz_other", "arguments": a}}
                                            for c, a in zip(m["tool_calls"], args)]})
    chars = set()
    for probe in changed:
        other = render(messages[:j] + [probe] + messages[j + 1:])
        a = 0
        while a < min(len(text), len(other)) and text[a] == other[a]:
            a += 1
        b, o = len(text), len(other)
        while b > a and o > a and text[b - 1] == other[o - 1]:
            b, o = b - 1, o - 1
        chars.update(range(a, b))
    return chars


def covered_characters(tok, text, labels):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    covered = np.zeros(len(text) + 1, dtype=bool)
    for (s, e), lab in zip(enc["offset_mapping"], labels):
        if lab != IGNORE_INDEX:
            covered[s:max(e, s + 1)] = True
    return covered, enc["input_ids"]


def check(tok, name, messages, closing=None, tool_closing=None, tools=TOOLS):
    """name: a FAMILY template (its closings are FAMILY's and TOOL_CLOSING's), or any other name with the
    closings given. tools: what tool conversations (and Hermes') are rendered with; given explicitly, every
    conversation is rendered with them."""
    if any(m.get("tool_calls") or m["role"] == "tool" for m in messages) or "Hermes" in name:
        tools = tools or TOOLS
    elif tools is TOOLS:
        tools = None
    try:
        messages, text = _with_template_arguments(ChatRenderer(tok, tools), messages)  # the form it renders
        assert text == tok.apply_chat_template(messages, tools=tools, tokenize=False)
    except Exception as e:  # the template itself refuses (Gemma: system; Llama-2: roles must alternate)
        with pytest.raises(ValueError):
            tokenize_conversation(tok, messages, 100000, tools=tools)
        return f"refused: {e}"
    try:
        out = tokenize_conversation(tok, messages, 100000, tools=tools)
    except TemplateDropsData as e:  # the template renders it without one of its pieces (finetune_coverage.py)
        return f"drops: {e}"
    covered, ids = covered_characters(tok, text, out["labels"])
    assert ids == out["input_ids"]
    render = functools.partial(tok.apply_chat_template, tools=tools, tokenize=False)
    closing = closing if closing is not None else FAMILY[name][2]
    tool_closing = tool_closing if tool_closing is not None else TOOL_CLOSING.get(name, closing)
    owned = np.zeros(len(text), dtype=bool)
    for j, m in enumerate(messages):
        chars = sorted(where(text, render, messages, j))
        if m["role"] != "assistant":
            bad = [c for c in chars if covered[c]]
            assert not bad, (m["role"], repr(text[bad[0]:bad[-1] + 1]), text)
            continue
        owned[chars] = True
        missing = [c for c in chars if not covered[c] and not text[c].isspace()]
        assert not missing, ("reply not trained", repr("".join(text[c] for c in missing)), text)
        if chars:  # what closes the turn comes right after it (after whitespace) and is trained too
            end = chars[-1] + 1
            end += len(text[end:]) - len(text[end:].lstrip())
            close = tool_closing if m.get("tool_calls") else closing
            if text.startswith(close, end):
                assert covered[end:end + len(close)].all(), ("end of turn not trained", close, text)
                owned[end:end + len(close)] = True
    for header in HEADERS:
        at = text.find(header)
        while at >= 0:
            if not owned[at:at + len(header)].any():
                assert not covered[at:at + len(header)].any(), ("header trained", header, text)
            at = text.find(header, at + 1)
    return "ok"


@pytest.mark.parametrize("real", REAL)
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_character_coverage_on_real_tokenizers(name, real):
    tok = family_tokenizer(real, name)
    results = {label: check(tok, name, copy.deepcopy(msgs)) for label, msgs in CONVERSATIONS.items()}
    assert sum(r == "ok" for r in results.values()) >= 5, results  # refusals are the template's own, and few


def test_first_word_after_a_separator_space_is_trained():
    """Llama-2 '[/INST] two </s>', Vicuna 'ASSISTANT: two</s>', DeepSeek 'Assistant: two<eos>': real tokenizers
    merge the space and the word ('▁two', 'Ġtwo'); a one-word answer must still be trained."""
    for real in REAL:
        for name in ("llama-2-chat.jinja", "vicuna.jinja", "deepseek-llm-chat.jinja"):
            tok = family_tokenizer(real, name)
            out = tokenize_conversation(tok, chat("two"), 1000)
            trained = [i for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX]
            assert "two" in tok.decode(trained), (real, name, tok.decode(trained))


# A template whose generation prompt ends with the separator space ('ASSISTANT: '), as many hand-written ones do:
# real tokenizers still encode the turn as 'ASSISTANT:' + '▁two', a token that straddles the prompt's end.
SPACE_IN_PROMPT = ("{% for m in messages %}{% if m.role == 'user' %}USER: {{ m.content }} {% else %}"
                   "ASSISTANT: {{ m.content }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: "
                   "{% endif %}")


@pytest.mark.parametrize("real", REAL)
def test_token_straddling_the_prompt_end_is_trained(real):
    tok = copy.deepcopy(real_tokenizer(real))
    tok.chat_template, tok.eos_token = SPACE_IN_PROMPT, "</s>" if real == "llama-spm" else tok.eos_token
    tok.add_special_tokens({"additional_special_tokens": ["</s>"]})
    for answer in ("two", "No", "😀 ok", "42"):
        out = tokenize_conversation(tok, chat(answer), 1000)
        covered, _ = covered_characters(tok, tok.apply_chat_template(chat(answer), tokenize=False), out["labels"])
        text = tok.apply_chat_template(chat(answer), tokenize=False)
        at = text.rindex("ASSISTANT: ") + len("ASSISTANT: ")
        assert covered[at:at + len(answer)].all(), (real, answer)
        assert not covered[:at - 1].any(), (real, answer)  # 'ASSISTANT:' itself is not trained


def test_every_end_token_and_no_trailer_command_r():
    tok = family_tokenizer("gpt-2", "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja")
    msgs = CONVERSATIONS["tool_dict_args"]
    out = tokenize_conversation(tok, msgs, 100000, tools=TOOLS)
    trained = tok.decode([i for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])
    # the real tool call is trained although the system preamble mentions <|START_RESPONSE|> in its text
    assert trained.count('"tool_name": "get_weather"') == 1 and "Paris" in trained
    assert trained.endswith("<|END_RESPONSE|><|END_OF_TURN_TOKEN|>")
    assert "<|CHATBOT_TOKEN|>" not in trained and "Format:" not in trained


def test_tool_call_turn_ends_with_its_own_token_functionary():
    tok = family_tokenizer("llama-spm", "meetkai-functionary-medium-v3.1.jinja")
    texts = spans(tokenize_conversation(tok, CONVERSATIONS["tool_dict_args"], 100000, tools=TOOLS), tok)
    assert texts[0].endswith("</function><|eom_id|>") and "ipython" not in texts[0], texts
    assert texts[1].strip() == "It is 21 degrees.<|eot_id|>", texts


def test_show_masking_and_dry_run_mark_trained_parts(tmp_path):
    """--show_masking N prints N samples with [[trained]] parts and exits; --dry_run logs the first one and
    writes it to data_report.json. The real Llama-2 tokenizer: the separator space is trained with the answer."""
    from conftest import run_finetune, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat("two")}, {"messages": chat("No", "yes")}])
    common = ["--model_name_or_path", SHARED / "tokenizers" / "llama-spm", "--data_path", data,
              "--chat_template", TEMPLATES / "llama-2-chat.jinja", "--dataset_cache_dir", tmp_path / "cache",
              "--output_dir", tmp_path / "out", "--train_sampling_strategy", "random"]
    out = run_finetune(common + ["--show_masking", "2"]).stdout
    assert "<s>[INST] question 0? [/INST][[ two </s>]]" in out, out
    assert "[/INST][[ No </s>]]<s>[INST] question 1? [/INST][[ yes </s>]]" in out, out
    assert not (tmp_path / "out").exists()  # nothing written: it only shows
    # --dry_run needs the model's config.json for its memory estimate: the tokenizer folder plus a tiny config
    from make_tiny_model import make_tiny_model

    model = make_tiny_model(str(tmp_path / "model"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "model" / f).write_bytes((SHARED / "tokenizers" / "llama-spm" / f).read_bytes())
    common[1] = model
    log = run_finetune(common + ["--dry_run"]).stdout
    assert "first sample, trained parts in [[...]]" in log and "[[ two </s>]]" in log, log
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["first_sample_marked"] == "<s>[INST] question 0? [/INST][[ two </s>]]"


# gpt-oss "harmony" shape: the final reply ends with <|return|>, a reply followed by more messages with <|end|>
HARMONY = ("{% for m in messages %}<|start|>{{ m.role }}{% if m.role == 'assistant' %}<|channel|>final{% endif %}"
           "<|message|>{{ m.content }}{% if m.role == 'assistant' and loop.last %}<|return|>"
           "{% else %}<|end|>{% endif %}"
           "{% endfor %}{% if add_generation_prompt %}<|start|>assistant{% endif %}")


def test_earlier_turn_closed_with_another_end_token_is_trained():
    tok = copy.deepcopy(real_tokenizer("gpt-2"))
    tok.chat_template = HARMONY
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|channel|>", "<|message|>", "<|end|>",
                                                          "<|return|>"]})
    assert spans(tokenize_conversation(tok, chat("two", "three"), 1000), tok) == [
        "<|channel|>final<|message|>two<|end|>", "<|channel|>final<|message|>three<|return|>"]


# functionary v3.2 shape: the generation prompt ends with '>>>'; the model writes the recipient ('all\n') itself
FUNCTIONARY_V32 = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                   "{% if m.role == 'assistant' %}>>>all\n{% endif %}{{ m.content }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n>>>{% endif %}")


def test_text_the_prompt_leaves_to_the_model_is_trained():
    tok = copy.deepcopy(real_tokenizer("deepseek-llm"))
    tok.chat_template = FUNCTIONARY_V32
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    out = tokenize_conversation(tok, chat("two"), 1000)
    trained = tok.decode([i for i, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX])
    assert trained == "all\ntwo<|eot_id|>"


def test_public_api_fallback_gives_the_same_labels(monkeypatch):
    """ChatRenderer mirrors apply_chat_template with transformers internals; without them (another transformers
    version) it renders through apply_chat_template itself, with the same result."""
    names = ["Qwen-Qwen3-0.6B.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja",
             "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja"]
    cases = [(n, label) for n in names for label in ("reasoning", "tool_dict_args", "multi_turn_system")]

    def labels():
        out = []
        for n, label in cases:
            try:
                out.append(tokenize_conversation(family_tokenizer("gpt-2", n), CONVERSATIONS[label], 100000,
                                                 tools=TOOLS if "tool" in label else None)["labels"])
            except ValueError as e:  # a template that drops part of the conversation: the same refusal both ways
                out.append(str(e))
        return out

    fast = labels()
    init = ChatRenderer.__init__

    def without_internals(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.template = None  # what __init__ sets when the internals are missing

    monkeypatch.setattr(ChatRenderer, "__init__", without_internals)
    assert labels() == fast


# A hand-written multi-line template (as many published ones): Jinja's whitespace makes the generation prompt
# '    ### Response:\n\n' where the turn reads '        ### Response:\ntwo</s>'.
INDENTED = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{ '### Instruction:\\n' + message['content'] | trim + '\\n\\n' }}
    {% elif message['role'] == 'assistant' %}
        {{ '### Response:\\n' + message['content'] | trim + eos_token + '\\n\\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '### Response:\\n' }}
{% endif %}"""


@pytest.mark.parametrize("real", REAL)
def test_prompt_that_differs_from_the_turn_only_in_whitespace(real):
    tok = copy.deepcopy(real_tokenizer(real))
    tok.chat_template = INDENTED
    tok.add_special_tokens({"additional_special_tokens": ["<s>", "</s>"]})
    tok.bos_token, tok.eos_token = "<s>", "</s>"
    out = tokenize_conversation(tok, chat("two", "### Response: No"), 1000)
    marked = __import__("finetune").marked_text(tok, out["input_ids"], out["labels"])
    assert marked.count("[[") == 2 and "### Response:\n[[two</s>]]" in marked, marked
    assert "### Response:\n[[### Response: No</s>]]" in marked, marked


# Command-R+ tool-use shape: a system block opens every conversation; a tool-call turn ends with "\n]```\n" and no
# end token; the tool result opens with <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>, as does the instruction block written
# after every conversation (before the generation prompt).
COMMAND_R_PLUS_TOOLS = (
    "{{ bos_token }}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Preamble\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] | trim }}{% set msgs = messages[1:] %}{% else %}Be helpful.{% set msgs = messages %}"
    "{% endif %}{% if tools %}\n## Available Tools\n{{ tools | tojson }}{% endif %}<|END_OF_TURN_TOKEN|>"
    "{% for m in msgs %}{% if m.role == 'user' %}"
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ m.content | trim }}<|END_OF_TURN_TOKEN|>"
    "{% elif m.role == 'assistant' and m.tool_calls %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{{ m.content | trim }}"
    "\nAction:\n```json\n[\n{% for c in m.tool_calls %}    {\n        \"tool_name\": \"{{ c.function.name }}\",\n"
    "        \"parameters\": {{ c.function.arguments | tojson }}\n    }{% if not loop.last %},\n{% endif %}"
    "{% endfor %}{{ '\\n]```\\n' }}{% elif m.role == 'assistant' %}"
    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{{ m.content | trim }}<|END_OF_TURN_TOKEN|>{% elif m.role == 'tool' %}"
    "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>\n{{ m.content | trim }}</results><|END_OF_TURN_TOKEN|>"
    "{% endif %}{% endfor %}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Write 'Action:' followed by a json-formatted "
    "list of actions.<|END_OF_TURN_TOKEN|>{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    "{% endif %}")


@pytest.mark.parametrize("real", REAL)
def test_tool_call_turn_without_end_token_before_a_shared_opener(real):
    """The trained part of each turn ends where the template ends it: the tool-call turn at ']```\n' (the tool
    result's header, which the text written after every conversation starts with too, is not trained), the text
    turns at <|END_OF_TURN_TOKEN|> (nothing of the next header nor of the closing instruction block)."""
    tok = copy.deepcopy(real_tokenizer(real))
    tok.chat_template = COMMAND_R_PLUS_TOOLS
    tok.add_special_tokens({"additional_special_tokens": [
        "<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|SYSTEM_TOKEN|>",
        "<|CHATBOT_TOKEN|>"]})
    tok.bos_token, tok.eos_token = "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"
    results = {label: check(tok, "command-r-plus-tool-use", copy.deepcopy(msgs), closing="<|END_OF_TURN_TOKEN|>",
                            tool_closing="") for label, msgs in CONVERSATIONS.items()}
    # this template renders no reasoning: that conversation is refused, every other one masked right
    assert results.pop("reasoning").startswith("drops: its reasoning of assistant turn 2")
    assert set(results.values()) == {"ok"}, results
    texts = spans(tokenize_conversation(tok, CONVERSATIONS["tool_dict_args"], 100000, tools=TOOLS), tok)
    assert texts[0].endswith('"city": "Paris"}\n    }\n]```\n') and "<|START_OF_TURN_TOKEN|>" not in texts[0], texts
    assert texts[1].strip() == "It is 21 degrees.<|END_OF_TURN_TOKEN|>", texts


# The real Command-R+ tool-use template, from llama.cpp (tests/templates/README.md): a tool-call turn ends with
# ']```\n' and no end token; the tool result opens with <|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>, as does the
# instruction block it writes after every conversation; it refuses a conversation without tools.
COMMAND_R_PLUS = Path(__file__).parent / "templates" / "CohereForAI-c4ai-command-r-plus-tool_use.jinja"


@pytest.mark.parametrize("real", REAL)
def test_command_r_plus_tool_use_real_template(real):
    """Every conversation, in the order a mixed dataset may hold them: first without tools (which this template
    refuses), then with them. Nothing of the tool result's opener after a tool-call turn is trained, nor of any
    header; every reply and its <|END_OF_TURN_TOKEN|> is. What the rule learns of a template is learned with the
    conversation's tools: a probe the template refuses (no tools) must not decide for the conversations it takes."""
    tok = copy.deepcopy(real_tokenizer(real))
    tok.chat_template = COMMAND_R_PLUS.read_text(encoding="utf-8")
    markers = sorted(set(_MARKERS.findall(tok.chat_template)) | {"<BOS_TOKEN>"})  # as the real model has them
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.bos_token, tok.eos_token = "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"
    without = {label: check(tok, "command-r-plus-tool-use", copy.deepcopy(msgs), closing="<|END_OF_TURN_TOKEN|>",
                            tool_closing="") for label, msgs in CONVERSATIONS.items()}
    assert [r for r in without.values() if r != "ok"] and all(r.startswith("refused") for r in without.values()
                                                                if r != "ok"), without
    with_tools = {label: check(tok, "command-r-plus-tool-use", copy.deepcopy(msgs), closing="<|END_OF_TURN_TOKEN|>",
                               tool_closing="", tools=DESCRIBED_TOOLS) for label, msgs in CONVERSATIONS.items()}
    # this template renders no reasoning: that conversation is refused (finetune_coverage), every other one masked
    assert with_tools.pop("reasoning").startswith("drops: its reasoning of assistant turn 2"), with_tools
    assert set(with_tools.values()) == {"ok"}, with_tools
    for label in ("tool_dict_args", "tool_string_args"):
        texts = spans(tokenize_conversation(tok, CONVERSATIONS[label], 100000, tools=DESCRIBED_TOOLS), tok)
        assert texts[0].endswith("    }\n]```\n") and "<|START_OF_TURN_TOKEN|>" not in texts[0], texts
        assert "<|SYSTEM_TOKEN|>" not in "".join(texts) and texts[1].endswith(".<|END_OF_TURN_TOKEN|>"), texts
