"""Label masking: loss only on what the assistant says, for every real chat template in ../shared/templates.

In-process: `tokenize_conversation` on the tiny tokenizer with each template set as its chat_template and the
family's bos/eos tokens. A span is a run of consecutive trained tokens, decoded: every assistant turn must give
exactly one span holding that turn as the template renders it plus its end-of-turn marker, and nothing of
system/user/tool turns or role headers."""

import copy
import re

import pytest

from conftest import SHARED
from finetune import IGNORE_INDEX, tokenize_conversation, tokenize_many

TEMPLATES = SHARED / "templates"
TOKENIZERS = SHARED / "tokenizers"
_MARKERS = re.compile(r"<\|[A-Za-z_]+\|>|<｜[^｜<>]+｜>|<(?:start|end)_of_turn>|\[/?[A-Z_]+\]")
# template file -> (bos, eos, what closes an assistant turn, marker strings that are plain text for this model)
FAMILY = {
    "Qwen-Qwen2.5-7B-Instruct.jinja": (None, "<|im_end|>", "<|im_end|>", ()),
    "Qwen-Qwen3-0.6B.jinja": (None, "<|im_end|>", "<|im_end|>", ()),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja": ("<|begin_of_text|>", "<|im_end|>", "<|im_end|>", ()),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja":
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>", "<end_of_turn>", ()),
    "ibm-granite-granite-3.3-2B-Instruct.jinja": (None, "<|end_of_text|>", "<|end_of_text|>", ()),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ()),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ()),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", "<|endoftext|>", "<|end|>", ()),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>", "</s>", ()),
    "llama-2-chat.jinja": ("<s>", "</s>", "</s>", ("[INST]", "[/INST]")),  # plain text for Llama-2
    "vicuna.jinja": ("<s>", "</s>", "</s>", ()),
    "deepseek-llm-chat.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>", ()),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja":
        ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>", ("[]",)),
    "meetkai-functionary-medium-v3.1.jinja": ("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", ()),
}
# What closes a tool-call turn where it is not what closes a text turn
TOOL_CLOSING = {"meetkai-functionary-medium-v3.1.jinja": "<|eom_id|>",
                "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": "<|END_ACTION|><|END_OF_TURN_TOKEN|>"}


def template_specials(name):
    """The template's marker strings, as the real model has them: single special tokens."""
    bos, eos, _, plain = FAMILY[name]
    found = set(_MARKERS.findall((TEMPLATES / name).read_text(encoding="utf-8"))) - set(plain)
    found |= {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"}
    return sorted(found | {t for t in (bos, eos) if t})


def with_template(tokenizer, name):
    """A copy of `tokenizer` set up as a model of this template's family would be."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (TEMPLATES / name).read_text(encoding="utf-8")
    bos, eos, _, _ = FAMILY[name]
    tok.add_special_tokens({"additional_special_tokens": template_specials(name)})
    if bos:
        tok.bos_token = bos
    tok.eos_token = eos
    return tok


# Text that must never be trained: role headers and turn openers of every family.
HEADERS = ["<|im_start|>", "<|start_header_id|>", "<start_of_turn>", "[INST]", "[/INST]", "<|user|>",
           "<|assistant|>", "<|system|>", "<|start_of_role|>", "<｜User｜>", "<｜Assistant｜>", "<tool_response>",
           "<|begin_of_text|>", "<bos>", "<｜begin▁of▁sentence｜>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]


def test_every_shared_template_is_covered():
    assert sorted(p.name for p in TEMPLATES.glob("*.jinja")) == sorted(FAMILY)


def spans(out, tok):
    """Decoded runs of consecutive trained tokens; also checks labels are input_ids or IGNORE_INDEX."""
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    assert labels[0] == IGNORE_INDEX or all(x != IGNORE_INDEX for x in labels)  # position 0 is never predicted
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        assert lab in (i, IGNORE_INDEX)
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def mask(tok, messages, tools=None, max_length=4096, **kw):
    return spans(tokenize_conversation(tok, messages, max_length, tools=tools, **kw), tok)


def conversations(name):
    """Conversations every template must mask right (Gemma gets no system turn: it refuses one)."""
    system = [] if "gemma" in name else [{"role": "system", "content": "SYSWORD be brief."}]
    return {
        "multi_turn": system + [
            {"role": "user", "content": "USERQ1 hello there"}, {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "USERQ2 what is 2+2?"}, {"role": "assistant", "content": "The answer is 4."},
            {"role": "user", "content": "USERQ3 thanks"}, {"role": "assistant", "content": "You are welcome."}],
        "whitespace": [
            {"role": "user", "content": "  USERQ1 padded \n"},
            {"role": "assistant", "content": "\n  padded answer  \n"},
            {"role": "user", "content": "USERQ2"}, {"role": "assistant", "content": " second "}],
        "identical_text": [
            {"role": "user", "content": "Paris"}, {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "Paris"}, {"role": "assistant", "content": "Paris"}],
        "chinese": ([] if "gemma" in name else [{"role": "system", "content": ""}]) + [
            {"role": "user", "content": "你好USERQ1"},
            {"role": "assistant", "content": "你好，我是一个人工智能助手。"}],
        "reasoning": [
            {"role": "user", "content": "USERQ1"},
            {"role": "assistant", "content": "<think>\nreason one\n</think>\n\nanswer one"},
            {"role": "user", "content": "USERQ2"},
            {"role": "assistant", "content": "<think>\nreason two\n</think>\n\nanswer two"}],
    }


# Conversations a template renders without part of them: refused (finetune_coverage.py), not masked.
# DeepSeek-R1 strips the reasoning from every turn; Mistral-Nemo writes the system prompt only into a last user
# message, so a conversation that ends with an answer loses it.
DROPS = {"deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": {"reasoning"},
         "mistralai-Mistral-Nemo-Instruct-2407.jinja": {"multi_turn"}}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_only_assistant_turns_are_trained(tokenizer, name):
    tok = with_template(tokenizer, name)
    _, eos, eot, _ = FAMILY[name]
    tools = TOOLS if "Hermes" in name else None  # Hermes' tool-use template renders only with tools
    for label, messages in conversations(name).items():
        if label in DROPS.get(name, ()):
            with pytest.raises(ValueError, match="does not appear in the rendered text"):
                mask(tok, messages, tools)
            continue
        got = mask(tok, messages, tools)
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert len(got) == len(answers), (label, got)
        for span, answer in zip(got, answers):
            if not eot.endswith(eos):  # a template may end the conversation with EOS after the turn
                span = span.removesuffix(eos).rstrip()
            assert span.endswith(eot), (label, span)
            body = span[: -len(eot)].replace("<|START_RESPONSE|>", "", 1)  # Command-R: the model writes it
            final = answer.split("</think>")[-1].strip()  # reasoning may be stripped by the template
            assert final in body, (label, span)
            # nothing else: at most template-written reasoning/think tags around the (possibly trimmed) answer
            leftover = body.replace(final, "", 1)
            for marker in ("<think>", "</think>", "reason one", "reason two"):
                leftover = leftover.replace(marker, "")
            assert not leftover.strip(), (label, span)
            assert not any(h in span for h in HEADERS), (label, span)
            assert "USERQ" not in span and "SYSWORD" not in span, (label, span)


@pytest.mark.parametrize("name,expected", [
    # the assistant turn has no header of its own (no system prompt: this template drops it, see DROPS)
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja",
     ["Hi! How can I help?</s>", "The answer is 4.</s>", "You are welcome.</s>"]),
    # trims content, injects a date in the system turn
    ("meta-llama-Llama-3.1-8B-Instruct.jinja",
     ["Hi! How can I help?<|eot_id|>", "The answer is 4.<|eot_id|>", "You are welcome.<|eot_id|>"]),
    # only the turn after the last user query gets an empty think block, written by the template: not trained
    ("Qwen-Qwen3-0.6B.jinja",
     ["Hi! How can I help?<|im_end|>", "The answer is 4.<|im_end|>", "You are welcome.<|im_end|>"]),
    # the conversation ends with EOS after the last turn: the model generates it
    ("microsoft-Phi-3.5-mini-instruct.jinja",
     ["Hi! How can I help?<|end|>", "The answer is 4.<|end|>", "You are welcome.<|end|>\n<|endoftext|>"]),
    # two end tokens; the template's trailing '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' is not the turn's
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja",
     ["<|START_RESPONSE|>Hi! How can I help?<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
      "<|START_RESPONSE|>The answer is 4.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
      "<|START_RESPONSE|>You are welcome.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"]),
    # a space between the prompt and the answer: trained with the answer
    ("llama-2-chat.jinja", [" Hi! How can I help? </s>", " The answer is 4. </s>", " You are welcome. </s>"]),
    ("deepseek-llm-chat.jinja", [" Hi! How can I help?<｜end▁of▁sentence｜>", " The answer is 4.<｜end▁of▁sentence｜>",
                                 " You are welcome.<｜end▁of▁sentence｜>"]),
])
def test_exact_spans_multi_turn(tokenizer, name, expected):
    chat = conversations(name)["multi_turn"]
    assert mask(with_template(tokenizer, name), chat[1:] if name in DROPS else chat) == expected


def test_reasoning_rewritten_in_earlier_turns(tokenizer):
    msgs = conversations("")["reasoning"]
    assert mask(with_template(tokenizer, "Qwen-Qwen3-0.6B.jinja"), msgs) == [
        "answer one<|im_end|>", "<think>\nreason two\n</think>\n\nanswer two<|im_end|>"]
    # DeepSeek-R1 strips the reasoning from every turn, the last one too: refused, not trained without it
    with pytest.raises(ValueError, match="assistant turn 1 .message 2. does not appear in the rendered text"):
        mask(with_template(tokenizer, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"), msgs)
    with pytest.raises(ValueError, match="assistant turn 1 .message 2. does not appear in the rendered text"):
        mask(with_template(tokenizer, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja"), msgs[2:])


def test_whitespace_kept_or_trimmed_as_the_template_renders_it(tokenizer):
    msgs = conversations("")["whitespace"]
    assert mask(with_template(tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja"), msgs) == [
        "\n  padded answer  \n<|im_end|>", " second <|im_end|>"]
    assert mask(with_template(tokenizer, "google-gemma-2-2b-it.jinja"), msgs) == [
        "padded answer<end_of_turn>", "second<end_of_turn>"]


def tool_chat(content=""):
    return [
        {"role": "system", "content": "SYSWORD You are helpful."},
        {"role": "user", "content": "USERQ1 weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": [{"id": "call00001", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
                                  "NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja"])
def test_tool_calls_are_trained_tool_results_are_not(tokenizer, name):
    tok = with_template(tokenizer, name)
    got = mask(tok, tool_chat(), TOOLS)
    assert got == [CALL + "<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]
    # content next to a tool call: Qwen renders both; Hermes only the call, so the conversation is refused
    if "Hermes" in name:
        with pytest.raises(ValueError, match="its text of assistant turn 1 .message 3. does not appear"):
            mask(tok, tool_chat("Let me check."), TOOLS)
    else:
        got = mask(tok, tool_chat("Let me check."), TOOLS)
        assert got == ["Let me check.\n" + CALL + "<|im_end|>", "It is 21 degrees in Paris.<|im_end|>"]


def test_tool_calls_llama_and_mistral(tokenizer):
    llama = with_template(tokenizer, "meta-llama-Llama-3.1-8B-Instruct.jinja")
    with pytest.raises(ValueError, match="its text of assistant turn 1"):  # text next to a call: Llama drops it
        mask(llama, tool_chat("ignored"), TOOLS)
    got = mask(llama, tool_chat(), TOOLS)
    assert got == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                   "It is 21 degrees in Paris.<|eot_id|>"]
    got = mask(with_template(tokenizer, "mistralai-Mistral-Nemo-Instruct-2407.jinja"), tool_chat()[1:], TOOLS)
    assert got == ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
                   "It is 21 degrees in Paris.</s>"]


def test_template_refusal_is_a_clear_value_error(tokenizer):
    tok = with_template(tokenizer, "google-gemma-2-2b-it.jinja")
    with pytest.raises(ValueError, match="System role not supported"):
        tokenize_conversation(tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}], 256)
    assert mask(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == ["b<end_of_turn>"]


def test_train_flags_and_train_on_prompt(tokenizer):
    tok = with_template(tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja")
    msgs = conversations("")["multi_turn"]
    msgs[2] = {**msgs[2], "train": False}
    msgs[4] = {**msgs[4], "loss_weight": 0}
    assert mask(tok, msgs) == ["You are welcome.<|im_end|>"]
    out = tokenize_conversation(tok, conversations("")["multi_turn"], 4096, train_on_prompt=True)
    assert out["labels"][1:] == out["input_ids"][1:]
    (last,) = tokenize_many(tok, [(conversations("")["multi_turn"], None)], 4096, last_turn_only=True)
    assert spans(last, tok) == ["You are welcome.<|im_end|>"]


def test_default_tokenizer_template_exact(tokenizer):
    msgs = [{"role": "user", "content": "USERQ1"}, {"role": "assistant", "content": "The answer is 42."}]
    out = tokenize_conversation(tokenizer, msgs, 256)
    assert out["input_ids"] == tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert spans(out, tokenizer) == ["The answer is 42.<|im_end|>"]


def test_overlong_keeps_whole_turns_and_never_yields_empty_labels(tokenizer):
    tok = with_template(tokenizer, "Qwen-Qwen2.5-7B-Instruct.jinja")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "short answer"},
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "The answer is 42. " * 40}]
    full = tokenize_conversation(tok, msgs, 100000)
    first_turn_end = len(tokenize_conversation(tok, msgs[:2], 100000)["input_ids"]) - 1  # without the last '\n'
    # the second turn does not fit: cut after the first one, which ends with its end-of-turn marker
    (res,) = tokenize_many(tok, [(msgs, None)], len(full["input_ids"]) - 5)
    assert res["status"] == "truncated" and len(res["input_ids"]) == first_turn_end
    assert spans(res, tok) == ["short answer<|im_end|>"]
    # the only trained turn is longer than the limit: keep what fits of it (trained tokens > 0)
    one = tokenize_conversation(tok, msgs[2:], 100000)
    limit = next(i for i, x in enumerate(one["labels"]) if x != IGNORE_INDEX) + 10
    (res,) = tokenize_many(tok, [(msgs[2:], None)], limit)
    assert res["status"] == "truncated" and len(res["input_ids"]) == limit
    assert any(x != IGNORE_INDEX for x in res["labels"][1:])
    # the prompt alone exceeds the limit: dropped with a reason, never a sample without trained tokens
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    (res,) = tokenize_many(tok, [(long_prompt, None)], limit)
    assert res["status"].startswith("dropped:") and res["input_ids"] == []
    with pytest.raises(ValueError):
        tokenize_conversation(tok, long_prompt, limit)
