"""What a rendered conversation must carry: a chat template that silently drops part of a record (tool calls,
the `tools` list, a system message, the reasoning of a trained turn) is caught before training.

One rule for every kind of loss: each piece of the record the model is meant to see or produce must appear in the
rendered text, where it belongs:
- every other message's text (system, user, tool result): in the whole text (templates move things: Llama 3.1 puts
  the tools into the first user message);
- an assistant turn's own content, each of its tool calls (the function name, every argument name and value) and
  its reasoning: in that turn's trained region; where a template rewrites earlier turns (Qwen3 drops the
  reasoning of turns before the last user message, by design), in the turn as the template renders it when it is
  the last one, i.e. when the model generates it;
- the `tools` schemas (each function's name and descriptions, its parameters' names and descriptions): in the
  whole text;
- each speaker `name` of a message (not of a tool result, which names the function it answers): in the whole text,
  found exactly (each name replaced by a marker of its own in one more render).
"Appear" is judged the way templates reformat, not by a list of templates: whitespace aside (Llama 3 trims
content, templates indent JSON), as a JSON string (Llama 3.1 writes a tool result with `tojson`), HTML-escaped
(functionary mixes `|safe` text in); tool-call arguments are looked for value by value, so any JSON layout or key
order passes. It is string search in text already rendered (the renders of a turn as the last message only where a
piece is missing), so it costs a few percent of preprocessing (bench/bench_coverage.py). Its limit: a short piece
that also stands elsewhere in the same text (a one-word system prompt repeated by the user) can hide its own loss.

Interface: dropped_piece(tokenizer, messages, tools, text, regions, template_kwargs) -> None, or
(kind, description) of the first piece missing; template_drops_data(origins, statuses, total) -> the one-line
error for a data set (TemplateDropsData, a ValueError). finetune.py calls the first on every conversation it
renders (status 'lost:KIND:DESCRIPTION') and raises the second before any model is loaded.
"""

import functools
import json

from markupsafe import escape  # jinja2's own escaping

from finetune_template import SENTINEL, ChatRenderer, _with_template_arguments, with_tool_call_ids

REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")  # transformers aliases them for templates
LOST = "lost:"  # the status prefix of a conversation the template renders without one of its pieces
FIX = ("--chat_template chatml (built-in: renders every message, `tools`, tool calls and results as Qwen2.5 and Hermes "
       "do, reasoning and speaker names) or --chat_template FILE with a template that renders it")
# Where the data can be changed instead of the template: a kind of piece -> the flag that does it
DATA_FIX = {"name": "--message_names content (writes 'NAME: ' before the message's text) or --message_names drop"}


class TemplateDropsData(ValueError):
    """The chat template renders conversations without part of what they hold: one line, exit code 2."""


def _squeeze(text):
    return "".join(text.split())


class _Hay:
    """text[a:b], searched as it is first (C speed, what most pieces need) and whitespace removed where that fails."""

    def __init__(self, text, a=0, b=None):
        self.text, self.a, self.b, self._squeezed = text, a, len(text) if b is None else b, None

    def squeezed(self):
        if self._squeezed is None:
            self._squeezed = _squeeze(self.text[self.a:self.b])
        return self._squeezed

    def has(self, value):
        """Whether it holds `value` the way a template may write it: as it is, whitespace aside, as the inside
        of a JSON string (escaped quotes and newlines: tojson on a string), HTML-escaped (a template that mixes
        `|safe` text in), as JSON or Python for numbers, booleans and null."""
        if not isinstance(value, str):
            return any(self.text.find(f, self.a, self.b) >= 0 for f in (json.dumps(value), repr(value)))
        value = value.strip()
        if not value or self.text.find(value, self.a, self.b) >= 0:
            return True
        squeezed = self.squeezed()
        if _squeeze(value) in squeezed:
            return True
        as_json = json.dumps(value, ensure_ascii=False)[1:-1]
        return any(_squeeze(f) in squeezed for f in (as_json, json.dumps(value)[1:-1], escape(value), escape(as_json)))


def _leaves(value):
    """Every key and scalar of a JSON value (tool-call arguments), depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@functools.lru_cache(maxsize=256)
def _schema_texts_of(schema_json):
    """_schema_texts of a schema given as JSON: records of one data set share a few tools."""
    return tuple(_schema_texts(json.loads(schema_json)))


def _schema_texts(schema):
    """What a function schema says that a template must show: its name, every description, every parameter name."""
    if isinstance(schema, dict):
        for k, v in schema.items():
            if k in ("name", "description", "title") and isinstance(v, str):
                yield v
            elif k == "properties" and isinstance(v, dict):
                yield from v  # parameter names
                for p in v.values():
                    yield from _schema_texts(p)
            elif k == "enum" and isinstance(v, list):
                yield from (e for e in v if isinstance(e, (str, int, float)))
            elif isinstance(v, (dict, list)):
                yield from _schema_texts(v)
    elif isinstance(schema, list):
        for v in schema:
            yield from _schema_texts(v)


def _short(text, n=40):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _arguments(call):
    """A tool call's arguments, decoded when they are a JSON string (the record may hold either)."""
    args = call["function"].get("arguments")
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            pass
    return args


def _call_text(call):
    fn, args = call["function"], _arguments(call)
    inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items()) \
        if isinstance(args, dict) else str(args or "")
    return f"{fn['name']}({_short(inner, 30)})"


def _reasoning(message):
    return next((message[k] for k in REASONING_FIELDS if isinstance(message.get(k), str) and message[k].strip()),
                None)


def _turn_pieces(message):
    """(kind, what, value or values) of an assistant turn, each to be found in the turn's rendered text."""
    if message.get("content"):
        yield "message", "its text", [message["content"]]
    reasoning = _reasoning(message)
    if reasoning:
        yield "reasoning", "its reasoning", [reasoning]
    for call in message.get("tool_calls") or []:
        yield "tool call", f"the tool call `{_call_text(call)}`", [call["function"]["name"], *_leaves(_arguments(call))]


def _why(template, kind):
    """Why a piece is missing, from the template's own text: whether it reads the field at all."""
    fields = {"tool call": ("tool_calls",), "tools": ("tools",), "reasoning": REASONING_FIELDS,
              "name": ("message.name", "message['name']", 'message["name"]')}.get(kind)
    if fields and not any(f in template for f in fields):
        return f"the chat template never reads `{fields[0]}`"
    return "the chat template leaves it out"


class _Turns:
    """Each assistant turn rendered as the last message (what the model generates for it), rendered lazily: only
    needed where a piece is missing from the full text."""

    def __init__(self, tokenizer, messages, tools, template_kwargs):
        self.args = tokenizer, messages, tools, template_kwargs

    def generated(self, i):
        tokenizer, messages, tools, kwargs = self.args
        render = ChatRenderer(tokenizer, tools, kwargs)
        try:
            history = render(_with_template_arguments(render, messages[:i])[0]) if i else ""
            turn = _with_template_arguments(render, messages[:i + 1])[1]
        except Exception:
            return _Hay("")
        k = 0
        while k < min(len(history), len(turn)) and history[k] == turn[k]:
            k += 1
        return _Hay(turn, k)

    def last_prompt(self):
        """The generation prompt of the last assistant turn, whitespace removed."""
        tokenizer, messages, tools, kwargs = self.args
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        render = ChatRenderer(tokenizer, tools, kwargs)
        try:
            return _Hay(render(_with_template_arguments(render, messages[:last])[0], True))
        except Exception:
            return _Hay("")


def dropped_piece(tokenizer, messages, tools, text, regions, template_kwargs=None):
    """None if `text` (the template's rendering of messages + tools; regions: each assistant turn's trained
    characters, as render_conversation gives them) carries every piece of the conversation, else (kind,
    description) of the first one missing: kind is message, tool call, tools or reasoning."""
    whole = _Hay(text)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template)  # only read to say why a piece is missing
    turns = _Turns(tokenizer, messages, tools, template_kwargs)
    assistant = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            if m.get("content") and not whole.has(m["content"]):
                what = "tool result" if m["role"] == "tool" else f"{m['role']} message"
                why = ("the chat template writes it only into the prompt of a reply that ends the conversation, "
                       "not into a conversation that goes on") if turns.last_prompt().has(m["content"]) \
                    else _why(template, "message")
                return "message", (f"the {what} of message {i + 1} (`{_short(m['content'])}`) does not appear in "
                                   f"the rendered text: {why}")
            continue
        a, b = regions[assistant] if assistant < len(regions) else (0, 0)
        assistant += 1
        region, generated = _Hay(text, a, b), None
        for kind, what, values in _turn_pieces(m):
            if all(region.has(v) for v in values):
                continue
            if generated is None:
                generated = turns.generated(i)
            missing = [v for v in values if not generated.has(v)]
            if missing:
                part = "" if kind != "tool call" or len(missing) == len(values) or values[0] in missing else \
                    f" (its `{_short(missing[0], 30)}`)"
                return kind, (f"{what}{part} of assistant turn {assistant} (message {i + 1}) does not appear in the "
                              f"rendered text: {_why(template, kind)}")
    named = _names_dropped(tokenizer, messages, tools, text, template_kwargs)
    if named:
        return named
    for t in tools or []:
        fn = t.get("function", t)
        missing = [s for s in _schema_texts_of(json.dumps(fn)) if not whole.has(s)]
        if missing:
            return "tools", (f"the tool schema `{fn.get('name')}` of the record's `tools` does not appear in the "
                             f"rendered text (`{_short(missing[0], 30)}` is missing): {_why(template, 'tools')}")
    return None


def _names_dropped(tokenizer, messages, tools, text, template_kwargs):
    """('name', description) of the first speaker `name` (of a message that is not a tool result: that one names the
    function it answers, linked to its call by tool_call_id) that the template does not render, else None. Each name
    is replaced by a marker of its own and looked for in that render: a name that also stands in some text (a user
    greeting "Alice") is not mistaken for a rendered one."""
    named = [i for i, m in enumerate(messages) if m.get("name") and m["role"] != "tool"]
    if not named:
        return None
    marks = {i: f"{SENTINEL}{k}{SENTINEL}" for k, i in enumerate(named)}
    render = ChatRenderer(tokenizer, tools, template_kwargs)
    try:
        probe = _with_template_arguments(render, with_tool_call_ids(
            [{**m, "name": marks[i]} if i in marks else m for i, m in enumerate(messages)]))[1]
    except Exception:
        probe = ""
    for i in named:
        if marks[i] not in probe:
            m = messages[i]
            return "name", (f"the speaker name `{_short(m['name'])}` of the {m['role']} message {i + 1} does not "
                            f"appear in the rendered text: {_why(tokenizer.chat_template or '', 'name')}")
    return None


def template_drops_data(origins, statuses, total):
    """origins/statuses of the conversations whose status starts with LOST, in data order; total: conversations
    read -> the TemplateDropsData to raise: the first record, what it lost, how many records are affected (by
    kind) and the fix."""
    kinds = {}
    for s in statuses:
        kind = s[len(LOST):].split(":", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    first = statuses[0][len(LOST):].split(":", 1)[1]
    by_kind = ", ".join(f"{k}: {n}" for k, n in kinds.items())
    fixes = [DATA_FIX[k] for k in kinds if k in DATA_FIX]
    return TemplateDropsData(f"{origins[0]}: {first}; {len(statuses)} of {total} records lose data this way "
                             f"({by_kind}), nothing was trained. Fix: {'; or '.join(fixes + [FIX])}.")
