"""Chat-template rendering for finetune.py and chat.py: which characters of a rendered conversation the model is
trained on, found by one rule from how the template renders (no template is known in advance); the template's
end-of-turn tokens and turn markers; the built-in templates (ChatML) for tokenizers that have none.

Interface: render_conversation(tokenizer, messages, tools) -> (text, [trained character region per assistant
turn]); reasoning_regions (--mask_reasoning: each turn's reasoning block); encode_regions(tokenizer, texts,
regions) -> token ids and each region's token span; marked_text / show_masking (--show_masking: the trained
tokens in [[...]]); IGNORE_INDEX (the label of an untrained token);
end_of_turn_tokens(tokenizer); turn_markers(tokenizer); chat_template_source(flag); parse_template_kwargs(text)
(--chat_template_kwargs); ChatRenderer (the fast
renderer it uses); BUILTIN_TEMPLATES. finetune.py turns the regions into token labels (tokenize_conversation);
finetune_tokens.py makes the markers single tokens and the end tokens eos; chat.py uses the end tokens to stop.
"""

import functools
import hashlib
import json
import os
import re

import numpy as np

from finetune_data import RecordError

# Used when a tokenizer has no chat template, and by --chat_template chatml: ChatML as Qwen2.5 writes it, tool calling
# included (Hermes' convention): `tools` in the system turn (<tools>, one JSON schema a line), each tool call as
# <tool_call>{"name": ..., "arguments": ...}</tool_call> in the assistant turn, tool results in <tool_response> in a
# user turn; reasoning (reasoning_content) in <think> before the answer, in every turn that has it; a message's
# speaker `name` (OpenAI: participants of one role) after its role, as OpenAI's ChatML did:
# <|im_start|>system name=example_user.
# A chat without tools, tool calls, reasoning or names renders exactly as plain ChatML.
CHATML_TEMPLATE = (
    "{%- macro header(message) %}{{- '<|im_start|>' + message['role'] }}"
    "{%- if message['name'] %}{{- ' name=' + message['name'] }}{%- endif %}{{- '\\n' }}{%- endmacro %}"
    "{%- if tools %}"
    "{%- if messages[0]['role'] == 'system' %}{{- header(messages[0]) }}{%- else %}{{- '<|im_start|>system\\n' }}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- header(message) }}"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message['content'] or '' }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if message['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}"
    "{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message['content'] or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}"
    "{{- header(message) + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# --chat_template NAME; chatml is also what a tokenizer without a chat template gets.
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}


def check_chat_template_flag(flag):
    if flag and flag not in BUILTIN_TEMPLATES and not os.path.isfile(flag):
        raise FileNotFoundError(f"--chat_template {flag}: no such file, and not a built-in template "
                                f"({', '.join(BUILTIN_TEMPLATES)}).")


def parse_template_kwargs(text, flag="--chat_template_kwargs"):
    """--chat_template_kwargs (JSON text, or None) -> the dict the template is rendered with; ValueError if it is not
    a JSON object (finetune.py and chat.py)."""
    try:
        kwargs = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not valid JSON ({e.msg} at column {e.colno}): {text!r}; e.g. "
                         "'{\"enable_thinking\": false}'") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"enable_thinking\": false}}'; got {text!r}.")
    return kwargs


def chat_template_source(flag, tokenizer):
    """--chat_template (a built-in name, a Jinja file, or None) -> (template text, what it is, for the log)."""
    if flag in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[flag], f"{flag} (built-in)"
    if flag:
        with open(flag, encoding="utf-8") as f:
            return f.read(), flag
    if tokenizer.chat_template:
        return tokenizer.chat_template, "the tokenizer's"
    return CHATML_TEMPLATE, "chatml (built-in ChatML: the tokenizer has none)"


# The whole conversation is rendered by the model's own template and tokenized once, so input_ids are
# exactly what `apply_chat_template` gives (the prefixes the rule compares are rendered, never tokenized).
# What to train is found by one rule, from how the template renders (nothing is searched for in the text,
# so no template needs to be known in advance):
#
#   the trained part of assistant turn i is what render(messages[:i+1]) adds to the generation prompt
#   render(messages[:i], add_generation_prompt=True): the model's answer, its tool calls and everything
#   the template writes to close the turn (all of its end tokens).
#
# The prompt is matched whitespace aside (hand-written templates indent it differently from the turn). If
# it is not a prefix of the turn (the template renders the turn with other text, e.g. DeepSeek-LLM's
# prompt 'Assistant:' and the turn 'Assistant: answer'), the turn starts where the two
# first differ. A template that supplies an empty reasoning block when thinking is off (Qwen3) has that
# block as part of a prompt: it is not trained when the template inserts it on its own. Text a template
# appends after every conversation (Command-R's next-turn opener) is not part of the turn. Nor is the template's
# turn opener (the special token its generation prompt starts with: <|im_start|>, <|START_OF_TURN_TOKEN|>) where it
# stands after the turn's content and tool calls: there the next message has begun, also when a turn has no end
# token of its own and the next message opens like the text written after every conversation (Command-R+ tool use:
# a tool-call turn ends with ']```\n', the tool result and the closing instructions open alike).
# Templates that render a turn differently once later messages follow (Qwen3 strips earlier reasoning,
# Mistral moves the system prompt into the last user turn) are mapped through the turn's content: the
# characters of the full text that change when only this turn's content changes are where it is.
# Tokens are trained if they overlap the trained characters, so a token that carries the separator space
# and the first word ('▁two', 'Ġtwo') is trained.

IGNORE_INDEX = -100  # the label of a token that is not trained
SENTINEL = "\ue000\ue001"  # private-use characters: never in real text, never stripped by a template
# Passed to the generation prompt to ask for the template's thinking-off prompt (Qwen3, SmolLM3, GLM: enable_thinking;
# DeepSeek-V3.1, Granite: thinking); templates that do not know them ignore them.
THINKING_OFF = {"enable_thinking": False, "thinking": False}
_TEMPLATE_FACTS = {}


class ChatRenderer:
    """render(messages, add_generation_prompt=False, **template_kwargs) -> text, exactly as
    tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) renders it (the same compiled template,
    None-valued keys dropped, reasoning fields aliased, tools as plain data, the special tokens as variables).
    It is called several times per conversation, so what apply_chat_template redoes on every call is done once:
    each message is prepared once (our messages are JSON data already: no defensive deep copy), and the Jinja
    context is built from a plain dict of the template's globals."""

    def __init__(self, tokenizer, tools=None, template_kwargs=None):
        self.tokenizer, self.tools, self.kwargs = tokenizer, tools, template_kwargs or {}
        self.prepared = {}  # id(message) -> (message, prepared); the message is kept so its id stays unique
        try:
            from transformers.utils import chat_template_utils as ctu

            self.template = ctu._compile_jinja_template(tokenizer.get_chat_template(None, tools))
            self.alias, self.plain = ctu._alias_reasoning_fields, ctu._plain_template_data
        except (ImportError, AttributeError):  # another transformers: its public API, one call per render
            self.template = None
            return
        self.globals = dict(self.template.globals)
        self.variables = {**self.globals, **self.plain(dict(tokenizer.special_tokens_map)), "tools": self.plain(tools),
                          "documents": None}

    def _prepare(self, message):
        hit = self.prepared.get(id(message))
        if hit is None or hit[0] is not message:
            hit = self.prepared[id(message)] = (message, self.alias([{k: v for k, v in message.items()
                                                                       if v is not None}])[0])
        return hit[1]

    def __call__(self, messages, add_generation_prompt=False, **template_kwargs):
        template_kwargs = {**self.kwargs, **template_kwargs}  # --chat_template_kwargs, then the call's own
        if self.template is None:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **template_kwargs)
        env = self.template.environment
        context = env.context_class(env, {**self.variables, **self.plain(template_kwargs),
                                          "messages": [self._prepare(m) for m in messages],
                                          "add_generation_prompt": add_generation_prompt},
                                    self.template.name, self.template.blocks, globals=self.globals)
        try:
            return env.concat(self.template.root_render_func(context))
        except Exception:
            env.handle_exception()


def _common_prefix(a, b):
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a, b):
    return _common_prefix(a[::-1], b[::-1])


def _special_tokens(tokenizer):
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def _snap_out_of_specials(text, k, specials):
    """k moved back to the start of a special token that text[k-1:k+1] would cut in two ('<|' is shared by
    '<|im_end|>' and '<|im_start|>' but is no boundary)."""
    for s in specials:
        p = text.find(s, max(0, k - len(s) + 1))
        if 0 <= p < k < p + len(s):
            k = p
    return k


def _template_facts(tokenizer, render):
    """(specials, has a thinking-off prompt, renders like apply_chat_template, turn opener) for this tokenizer and
    template, from one probe chat; cached. The turn opener is the special token that the generation prompt starts
    with (what it adds to the conversation: '<|im_start|>', '<|start_header_id|>', '<|START_OF_TURN_TOKEN|>'), or
    None when it adds no special token."""
    # The probe is rendered with the conversation's tools, and what it finds holds for conversations with tools, or
    # for those without: a template may render (or refuse) a chat differently without them. A probe the template
    # refuses teaches nothing and is not kept (the conversation that follows may render; a refused one says why).
    key = (id(tokenizer), len(tokenizer), tokenizer.chat_template, str(tokenizer.special_tokens_map),
           json.dumps(render.kwargs, sort_keys=True), bool(render.tools))
    if key in _TEMPLATE_FACTS:
        return _TEMPLATE_FACTS[key]
    specials = _special_tokens(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes", "reasoning_content": "r"}]
    try:
        same = render(probe) == tokenizer.apply_chat_template(probe, tools=render.tools, tokenize=False,
                                                              **render.kwargs)
        thinking_off = render(probe[:1], True, **THINKING_OFF) != render(probe[:1], True)
        prompt, history = render(probe[:1], True), render(probe[:1])
        added = prompt[_snap_out_of_specials(prompt, _common_prefix(prompt, history), specials):]
        opener = next((s for s in specials if added.lstrip().startswith(s)), None)
    except Exception:
        return tuple(specials), False, True, None
    _TEMPLATE_FACTS[key] = (tuple(specials), thinking_off, same, opener)
    return _TEMPLATE_FACTS[key]


def _prompt_end(render, messages, i, prompt, turn, specials):
    """Where the generation prompt of turn i ends in `turn` (= render(messages[:i+1])) when the prompt is not a
    prefix of it: the template renders the turn's opener differently (DeepSeek-R1's prompt ends in '<think>\\n'),
    or the history (a system prompt moved into the last user turn, a tool result closed differently when it is
    last). Both are aligned after the previous message's content, and, if what stands right before the turn's
    content is the prompt's own ending, the prompt ends there."""
    start = _snap_out_of_specials(turn, _common_prefix(prompt, turn), specials)
    if i > 0:
        before = {**messages[i - 1], "content": SENTINEL}
        probe = messages[:i - 1] + [before]
        in_prompt = _diff(prompt, render(probe, True))
        in_turn = _diff(turn, render(probe + [messages[i]]))
        if in_prompt and in_turn:
            k = in_turn[1] + _common_prefix(prompt[in_prompt[1]:], turn[in_turn[1]:])
            start = max(start, _snap_out_of_specials(turn, k, specials))
    c = (_where_content(render, turn, messages[:i + 1], i) or (None,))[0]
    if c is not None and c > start and turn[c - _common_suffix(prompt, turn[:c]):c].strip():
        start = c
    return start


def _after_prompt(prompt, turn):
    """Where `prompt` ends in `turn` if the turn starts with it, whitespace aside (hand-written templates often
    indent the generation prompt, or end it with another newline, than the turn they render), else None."""
    if turn.startswith(prompt):
        return len(prompt)
    i = j = _common_prefix(prompt, turn)
    while i < len(prompt):
        if prompt[i].isspace():
            i += 1
            continue
        while j < len(turn) and turn[j].isspace():
            j += 1
        if j == len(turn) or turn[j] != prompt[i]:
            return None
        i, j = i + 1, j + 1
    if prompt[-1:].isspace():  # the prompt ends with whitespace: so does what it supplies of the turn
        while j < len(turn) and turn[j].isspace():
            j += 1
    return j


def _generated_part(prompts, turn, specials, eos, prompt_end, history):
    """(start, end) in `turn` (= render(messages[:i+1])) of what the model generates for its last turn, given
    the generation prompts the template gives for messages[:i] (default first, then thinking-off).
    prompt_end(): _prompt_end for the default prompt; history(): render(messages[:i]) (both lazy)."""
    full = [k for k in (_after_prompt(p, turn) for p in prompts) if k is not None]
    start = max(full) if full else prompt_end()
    end = len(turn)
    # Text the template writes after the last message of any conversation (an unconditional next-turn opener,
    # Command-R) ends the generation prompt and history() too: it is not part of the turn. It starts at a
    # special token, and after the EOS token if the shared text has one (nothing after EOS is generated).
    shared = _common_suffix(prompts[0], turn[start:]) if prompts[0][-1:] == turn[-1:] else 0
    if shared and turn[end - shared:].strip():
        tail = turn[end - shared:]
        cut = tail.rfind(eos) + len(eos) if eos and eos in tail else \
            min((p for p in (tail.find(s) for s in specials) if p >= 0), default=None)
        if cut is not None and cut < len(tail) and history().endswith(tail[cut:]):
            end -= len(tail) - cut
    return start, max(start, end)


@functools.lru_cache(maxsize=64)
def _ends_with_special(specials):
    """A test of whether a text ends with one of `specials` (a tuple), reading only the text's last characters."""
    pattern = re.compile("(?:" + "|".join(map(re.escape, specials)) + r")\Z") if specials else re.compile(r"(?!)")
    longest = max(map(len, specials), default=0)
    return lambda text: pattern.search(text, max(0, len(text) - longest)) is not None


def _trim_after_end_token(text, start, end, specials):
    """Whitespace after a turn's final special token is never generated: not trained."""
    body = text[start:end].rstrip()
    if len(body) == end - start or not body:
        return start, end
    return (start, start + len(body)) if _ends_with_special(specials)(body) else (start, end)


def _diff(text, other):
    """(start, end) of the characters of `text` that differ from `other`, or None if they are equal."""
    if text == other:
        return None
    a = _common_prefix(text, other)
    return a, len(text) - _common_prefix(text[a:][::-1], other[a:][::-1])


def _content_probes(message):
    """Copies of an assistant message with its content, and separately its tool call names, replaced by a
    sentinel: some templates render only one of the two."""
    probes = [{**message, "content": SENTINEL}]
    if message.get("tool_calls"):
        probes.append({**message, "tool_calls": [{**c, "function": {**c["function"], "name": SENTINEL}}
                                                 for c in message["tool_calls"]]})
    return probes


def _where_content(render, text, messages, i):
    """(start, end) of the characters of `text` (render of messages) that turn i's content and tool calls
    decide, or None if the template does not render them."""
    diffs = []
    for k, probe in enumerate(_content_probes(messages[i])):
        try:
            d = _diff(text, render(messages[:i] + [probe] + messages[i + 1:]))
        except Exception:
            if k == 0:
                raise
            continue
        if d:
            diffs.append(d)
    return (min(d[0] for d in diffs), max(d[1] for d in diffs)) if diffs else None


def _map_turn(render, text, messages, i, turn, start, end, specials):
    """Turn i's trained region in `text`, when the template renders it there differently from `turn` (its
    render as the last message): the turn's content is located in both, and what surrounds it in `turn`
    (reasoning, tool calls, end tokens) is kept where `text` has it too."""
    in_text = _where_content(render, text, messages, i)
    in_turn = _where_content(render, turn, messages[:i + 1], i)
    if in_text is None or in_turn is None:
        return 0, 0  # the template does not render this turn here: nothing to train
    before, after = turn[start:in_turn[0]], turn[in_turn[1]:end]
    lead = _common_suffix(before, text[:in_text[0]])
    if not before[len(before) - lead:].strip():
        lead = 0  # only whitespace in common: the opener's own newline, not something the model writes
    trail = _snap_out_of_specials(text, in_text[1] + _common_prefix(after, text[in_text[1]:]), specials)
    rest = text[trail:]
    if trail == in_text[1] and any(after.lstrip().startswith(s) for s in specials):
        # nothing of the closing matches: the template closes the turn with another end token once more
        # messages follow (gpt-oss: <|end|> where the last turn has <|return|>); that token is the closing
        closing = next((s for s in specials if rest.lstrip().startswith(s)), None)
        trail += len(rest) - len(rest.lstrip()) + len(closing) if closing else 0
    return in_text[0] - lead, max(trail, in_text[1])


def _before_next_opener(render, text, messages, i, start, end, opener):
    """The end of turn i's trained region cut where the template's turn opener stands after the turn's content
    and tool calls: there the next message (or the text written after every conversation) has begun."""
    content = _where_content(render, text, messages, i)
    at = text.find(opener, max(start, content[1]), end) if content else -1
    return end if at < 0 else at


def _arguments_as_strings(messages):
    """Tool-call arguments as JSON strings, for templates that print them as they are (functionary)."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} if not isinstance(c["function"].get("arguments"), str)
        else c for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def _with_template_arguments(render, messages):
    """Messages as this template renders them right, and their render. Arguments are given as a dict (what
    HF documents and most templates pass to tojson); a template that cannot render a dict (raises, or prints
    its Python repr) gets them as a JSON string instead."""
    calls = [c["function"].get("arguments") for m in messages for c in m.get("tool_calls") or []]
    dicts = [a for a in calls if isinstance(a, dict) and a]
    try:
        text = render(messages)
        if not any(repr(a) in text for a in dicts):
            return messages, text
    except Exception:
        if not dicts:
            raise
    messages = _arguments_as_strings(messages)
    return messages, render(messages)


def with_tool_call_ids(messages):
    """Tool calls without an id get one, and the tool results that answer them (in order) its tool_call_id: nine
    hex digits from the call itself. LLaMA-Factory's sharegpt data has no ids; templates that render them
    (Mistral's require nine characters) would refuse or render an empty one."""
    if not any(m.get("tool_calls") for m in messages):
        return messages
    out, pending = [], []
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            pending = []
            calls = [c if c.get("id") else {**c, "id": hashlib.sha1(json.dumps(
                [i, k, c["function"]], sort_keys=True, default=str).encode()).hexdigest()[:9]}
                for k, c in enumerate(m["tool_calls"])]
            m, pending = {**m, "tool_calls": calls}, [c["id"] for c in calls]
        elif m["role"] == "tool" and not m.get("tool_call_id") and pending:
            m = {**m, "tool_call_id": pending.pop(0)}
        out.append(m)
    return out


def render_conversation(tokenizer, messages, tools=None, template_kwargs=None):
    """-> (text, [(start, end) character region to train, for each assistant turn]). template_kwargs
    (--chat_template_kwargs, e.g. enable_thinking) go to every render. Raises RecordError if the template
    refuses the conversation."""
    try:
        render = ChatRenderer(tokenizer, tools, template_kwargs)
        specials, thinking_off, same, opener = _template_facts(tokenizer, render)
        if not same:  # this transformers renders differently from what ChatRenderer mirrors: use its own API
            render.template = None
        messages, text = _with_template_arguments(render, with_tool_call_ids(messages))
        regions = []
        for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompts = [render(messages[:i], True)]
            if thinking_off:
                prompts.append(render(messages[:i], True, **THINKING_OFF))
            turn = render(messages[:i + 1]) if i + 1 < len(messages) else text
            prompt_end = functools.partial(_prompt_end, render, messages, i, prompts[0], turn, specials)
            start, end = _generated_part(prompts, turn, specials, tokenizer.eos_token, prompt_end,
                                         functools.partial(render, messages[:i]))
            if not text.startswith(turn[:end]):
                start, end = _map_turn(render, text, messages, i, turn, start, end, specials)
            if opener and opener in text[start:end]:
                end = _before_next_opener(render, text, messages, i, start, end, opener)
            regions.append(_trim_after_end_token(text, start, end, specials))
    except Exception as e:  # jinja raise_exception, undefined fields, type errors inside the template
        raise RecordError("messages", f"the chat template refuses this conversation: {e}"
                          + _needs_tools(tokenizer, messages, tools, template_kwargs)) from None
    return text, regions


def reasoning_regions(tokenizer, messages, tools, text, regions, template_kwargs=None):
    """--mask_reasoning: for each assistant turn, the characters of `text` (render_conversation's, with its trained
    `regions`) that are its reasoning block, to be kept out of the loss, or (0, 0). Found by the rule that finds
    everything else, from how the template renders: the characters that change when only this turn's reasoning is
    removed are the reasoning; where they stand before the turn's answer (its content and tool calls: every template
    seen), the block is the whole of the turn before the answer, its markup included (<think>...</think>, however
    the template writes it, also where the template writes an empty block for a turn without reasoning)."""
    render = ChatRenderer(tokenizer, tools, template_kwargs)
    messages = _with_template_arguments(render, with_tool_call_ids(messages))[0]
    out, k = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        (a, b), k = regions[k], k + 1
        if not m.get("reasoning_content") or b <= a:
            out.append((0, 0))
            continue
        without = messages[:i] + [{**m, "reasoning_content": None}] + messages[i + 1:]
        d = _diff(text, render(without))
        if d is None or d[1] <= a or d[0] >= b:
            out.append((0, 0))  # not rendered in the trained part (e.g. Qwen3 drops earlier turns' reasoning)
            continue
        answer = _where_content(render, text, messages, i)
        if answer and a <= d[0] and d[1] <= answer[0] <= b:
            out.append((a, answer[0]))
        else:
            out.append((max(a, d[0]), min(b, d[1])))
    return out


def _needs_tools(tokenizer, messages, tools, template_kwargs):
    """The hint for a template that fails on a conversation without `tools` but renders it with an empty list (a
    tool-use template, e.g. Hermes-3's), else ''."""
    if tools:
        return ""
    try:
        ChatRenderer(tokenizer, [], template_kwargs)(with_tool_call_ids(messages))
    except Exception:
        return ""
    return (" (it renders only with `tools`, and this record has none: a tool-use template; train chats without tools "
            "with the model's default template or --chat_template chatml)")


def _specials_in(text, specials):
    """The special tokens in `text`, in order."""
    found, k = [], 0
    while k < len(text):
        s = next((s for s in specials if text.startswith(s, k)), None)
        found += [s] if s else []
        k += len(s) if s else 1
    return found


PROBE_TOOL = {"type": "function", "function": {"name": "probe", "description": "A probe", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "description": "A query"}}, "required": ["q"]}}}


def end_of_turn_tokens(tokenizer, template_kwargs=None):
    """The special tokens the template writes to close an assistant turn, where generation must stop: every one
    that closes a text turn (e.g. ['<|im_end|>'], ['<|END_RESPONSE|>', '<|END_OF_TURN_TOKEN|>']), then the last one
    of a tool-call turn where that is another (Llama 3.1's and functionary's <|eom_id|>)."""
    specials = _special_tokens(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    try:
        text, ((_, end),) = render_conversation(tokenizer, probe, template_kwargs=template_kwargs)
    except RecordError:  # a tool-use template that renders only with tools (Hermes)
        text, ((_, end),) = render_conversation(tokenizer, probe, [PROBE_TOOL], template_kwargs)
    found = _specials_in(text[text.find(SENTINEL) + len(SENTINEL):end], specials)
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "probe", "arguments": {"q": "x"}}}]}
    try:  # a template that renders no tool calls closes this turn as a text turn
        text, ((start, end),) = render_conversation(tokenizer, probe[:1] + [call], [PROBE_TOOL], template_kwargs)
        last = _specials_in(text[start:end].rstrip(), specials)[-1:]
        if last and text[start:end].rstrip().endswith(last[0]) and last[0] not in found:
            found += last
    except RecordError:
        pass
    return found


# What a turn marker looks like: <|im_start|>, <｜User｜>, <start_of_turn>, </s>, <think> (not '<<SYS>>' nor text
# in angle brackets with spaces). Bracketed markers ([INST]) are written as plain text by the models that use them.
_MARKER = re.compile(r"(?<!<)<(?:\|[^<>|\s]+\||｜[^<>｜\s]+｜|/?[A-Za-z_][\w.:-]*)>(?!>)")


def render_probe(tokenizer, messages, add_generation_prompt=False):
    """A probe conversation rendered by the template, with the probe tool where it renders only with tools
    (Hermes); None if it refuses both ways."""
    for tools in (None, [PROBE_TOOL]):
        try:
            return ChatRenderer(tokenizer, tools)(messages, add_generation_prompt)
        except Exception:
            continue
    return None


def turn_markers(tokenizer):
    """The marker strings the template writes between a user message and the answer and after the answer (the
    user's and the assistant's closings and headers, its generation prompt), in order of first appearance: what
    must be single tokens for a model to learn whose turn it is and where it ends. Found by rendering a probe
    chat; what the template writes before the first user message (BOS, a system header, a tools preamble with
    its placeholders) is left out."""
    chat = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": SENTINEL}] * 2
    text, prompt = render_probe(tokenizer, chat), render_probe(tokenizer, chat[:-1], True)
    if text is None or prompt is None:
        return []
    pieces = text.split(SENTINEL)[1:] + prompt.split(SENTINEL)[-1:]
    return list(dict.fromkeys(m for piece in pieces for m in _MARKER.findall(piece)))


# Character regions -> token spans, for finetune.py's labels


def _token_spans(offsets, regions):
    """Character regions -> token index ranges: the tokens that overlap each region (a token that starts in
    the prompt and carries the region's first character is in; so is every byte token of a split character)."""
    offsets = np.maximum.accumulate(offsets, axis=0) if len(offsets) else offsets.reshape(0, 2)
    spans = []
    for a, b in regions:
        lo = int(np.searchsorted(offsets[:, 1], a, side="right"))  # first token ending after a
        hi = int(np.searchsorted(offsets[:, 0], b, side="left"))  # first token starting at or after b
        spans.append((lo, max(lo, hi)) if b > a else (lo, lo))
    return spans


def encode_regions(tokenizer, texts, regions):
    """[(ids, spans)] for each text: numpy token ids exactly as tokenizer(texts, add_special_tokens=False)
    gives them, and the range of tokens overlapping each character region. When the Rust tokenizer has no
    truncation/padding set (what that call would switch off) it is called directly, and only the region
    boundaries are looked up (char_to_token gives the first token covering a character) instead of
    converting every token's offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        out = []
        for e, text, regs in zip(backend.encode_batch(texts, add_special_tokens=False), texts, regions):
            ids = np.asarray(e.ids, dtype=np.int64)

            def first_starting_at(c, e=e, text=text, ids=ids):  # first token starting at or after character c
                if c >= len(text):
                    return len(ids)
                t = e.char_to_token(c)
                while t is not None and t < len(ids) and e.token_to_chars(t)[0] < c:
                    t += 1
                return t

            spans = []
            for a, b in regs:
                lo = e.char_to_token(a) if a < len(text) else len(ids)
                spans.append((lo, lo) if b <= a else (lo, first_starting_at(b)))
            if any(x is None for span in spans for x in span):  # a character no token covers: use offsets
                spans = _token_spans(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), regs)
            out.append((ids, spans))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int64), _token_spans(np.asarray(o, dtype=np.int64).reshape(-1, 2), r))
            for ids, o, r in zip(enc["input_ids"], enc["offset_mapping"], regions)]


def marked_text(tokenizer, input_ids, labels, mark=("[[", "]]")):
    """The sample's text with every run of trained tokens between [[ and ]]. Each piece is decoded as part of
    everything before it, so separator spaces ('▁two') show where they are."""
    ids = list(input_ids)
    trained = [lab != IGNORE_INDEX for lab in labels]
    cuts = [0] + [k for k in range(1, len(ids)) if trained[k] != trained[k - 1]] + [len(ids)]
    decoded = [tokenizer.decode(ids[:k], skip_special_tokens=False) for k in cuts]
    pieces = []
    for a, before, upto in zip(cuts, decoded, decoded[1:]):
        piece = upto[len(before):]
        pieces.append(f"{mark[0]}{piece}{mark[1]}" if trained[a] else piece)
    return "".join(pieces)


def show_masking(tokenizer, dataset, n):
    """--show_masking N: print N samples with their trained parts marked."""
    print(f"turn end: {' '.join(tokenizer.finetune_vocabulary['turn_end_tokens'])}; eos {tokenizer.eos_token}")
    for k in range(min(n, len(dataset))):
        row = dataset[k]
        print(f"----- sample {k} ({row['length']} tokens, {row['n_trained']} trained; [[trained]]) -----")
        print(marked_text(tokenizer, row["input_ids"], row["labels"]), flush=True)
    return None
