"""Reading training data for finetune.py: what a data file holds (recognised by content: gzip, other encodings,
stray NUL bytes, Parquet/ZIP/... where JSON is expected), JSONL and JSON arrays read record by record with their line
numbers, Parquet/Arrow/CSV/TSV tables read row by row (a column of the wrong type for its key is one error),
--columns renaming, the format adapters (messages, ShareGPT, Alpaca, MFTCoder chat_rounds, TRL's
prompt/completion: every record becomes `messages` + `tools`; TRL's text stays text) and record validation
(`file:line: field: problem`, `file:row N: field: problem`). Which files an entry names is finetune_sources.py's.

Interface: read_records(path, options) -> (line | 'row N', record); normalized_rows(entries, ...) yields validated
rows for datasets.Dataset.from_generator; read_keys (the ledger of keys: every key of a record and of its
messages read, read under another name, ignored by rule or reported), detect_format, normalize_record,
normalize_text, is_trained, held_out_counts, held_out_split, sample_indices; the errors DataError (a file or the
data as a whole) and RecordError (one record).
"""

import csv
import gzip
import json
import math
import re
import sys
import zlib

import numpy as np

from finetune_console import log0, suggest


class DataError(ValueError):
    """The data cannot be used: one line per problem, each starting with `file:line:` where there is one."""


# Read in folders; .txt (one text per line) only when named, since folders hold notes and licences as .txt.
DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".arrow", ".csv", ".tsv")
READ_SUFFIXES = DATA_SUFFIXES + (".txt",)
KINDS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT (`from`) and MFTCoder (`role`) speaker names -> our roles.
SPEAKER_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "bot": "assistant",
    "assistant": "assistant", "model": "assistant", "function_call": "assistant", "observation": "tool",
    "function": "tool", "tool": "tool", "developer": "system",
}


# Keys a message/turn may carry (messages, sharegpt, chat_rounds); a near-miss of one is a typo, an error.
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content", "train",
                "loss_weight", "weight", "from", "value")


class RecordError(ValueError):
    """A problem with one record: `field` names where (e.g. messages[2].content)."""

    def __init__(self, field_name, problem):
        super().__init__(f"{field_name}: {problem}")
        self.field_name, self.problem = field_name, problem


# Leading bytes of files that are not JSON text -> what they are.
MAGIC = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a ZIP archive", b"BZh": "bzip2-compressed",
         b"\xfd7zXZ": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed", b"ARROW1": "an Arrow file"}
ENCODINGS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _open_json_text(path):
    """The file as a binary stream of UTF-8 JSON text, or DataError saying in one line what it is instead.
    gzip is recognised by its content, not its name."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    f = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else None
    raw.seek(0)
    if f is None and path.lower().endswith(".gz"):
        raw.close()
        raise DataError(f"{path}: named .gz but not gzip data; rename it (drop .gz) or re-create it.")
    if f is not None and not path.lower().endswith(".gz"):
        log0(f"{path}: gzip-compressed although not named .gz; reading it decompressed.")
    f = f or raw
    head = f.read(4096)
    f.seek(0)
    kind = next((what for magic, what in MAGIC.items() if head.startswith(magic)), None)
    encoding = next((enc for bom, enc in ENCODINGS.items() if head.startswith(bom)), None)
    wide = not kind and _wide_encoding(head)
    if encoding or wide:
        f.close()
        raise DataError(f"{path}: text encoded as {encoding or wide + ' (NUL bytes between the characters)'}, not "
                        f"UTF-8; convert it, e.g. iconv -f {encoding or wide} -t UTF-8 {path} > {path}.utf8")
    if kind:
        f.close()
        named = {"a Parquet file": ".parquet", "an Arrow file": ".arrow"}.get(kind)
        raise DataError(f"{path}: {kind}, not JSON text; " + (f"name it {named} to read it as such." if named else
                                                               f"give {'/'.join(READ_SUFFIXES)} files."))
    return f


def _wide_encoding(head):
    """'UTF-16'/'UTF-32' for text without a BOM whose NUL bytes sit at every second (fourth) position, as ASCII
    characters give; None for UTF-8 with stray NUL bytes (a damaged record, a NUL-filled tail after a crash),
    whose lines are named by the reader instead."""
    n = len(head) - len(head) % 4
    if n < 8 or b"\x00" not in head:
        return None
    zero = [head[i:n:4].count(0) > n // 8 for i in range(4)]  # more than half of that position's bytes are NUL
    return {(False, True, False, True): "UTF-16", (True, False, True, False): "UTF-16",
            (False, True, True, True): "UTF-32", (True, True, True, False): "UTF-32"}.get(tuple(zero))


def _nul_problem(text):
    """The problem of a record holding NUL bytes, or None."""
    nul = "\x00" if isinstance(text, str) else b"\x00"
    if nul not in text:
        return None
    if not text.strip(nul + (" \t\r\n" if isinstance(text, str) else b" \t\r\n")):
        return (f"{text.count(nul)} NUL bytes and nothing else: this part of the file was never written (a crash "
                "while writing?); cut them off (e.g. tr -d '\\000') or re-create the file")
    return "NUL bytes (\\x00) inside the record: a damaged line; fix or remove it"


def _wrapper_key(value):
    """The key of a JSON object that holds the records as a list (e.g. {"version": 1, "data": [...]})."""
    if isinstance(value, dict) and detect_format(value) is None:
        for key, items in value.items():  # a list of records, not of messages ({"conversation": [{"role": ...}]})
            if isinstance(items, list) and items and isinstance(items[0], dict) and (
                    detect_format(items[0]) or not {"role", "from", "content", "value"} & set(items[0])):
                return key
    return None


def _not_records(path, value, line):
    key = _wrapper_key(value)
    if key is not None:
        raise DataError(f"{path}:{line}: the top level is a JSON object, not records; the records seem to be the "
                        f"list under {key!r}: give that list as a JSON array or as JSONL (e.g. jq -c '.{key}[]' "
                        f"{path} > data.jsonl).")


def read_json_records(path):
    """Yield (line, record-or-RecordError) from a JSONL file or a JSON array (BOM, CRLF, blank lines ok).
    JSONL is streamed line by line; line numbers count '\\n' like editors do. A problem with the file as a
    whole (not JSON text, truncated gzip, data after the array, ...) raises DataError naming the file."""
    bom = b"\xef\xbb\xbf"
    try:
        f = _open_json_text(path)
        with f:
            head = b""
            while not head.strip():  # peek past leading whitespace: '[' means a JSON array
                chunk = f.read(65536)
                if not chunk:
                    break
                head += chunk
            f.seek(0)
            first = head.removeprefix(bom).lstrip()[:1]
            if not first:
                raise DataError(f"{path}: {'empty file' if not head else 'only blank lines'}: no records.")
            if first == b"[":
                yield from _array_records(path, f.read())
                return
            first_line = True
            for line_no, raw in enumerate(f, 1):
                raw = raw.removeprefix(bom)
                if not raw.strip():
                    continue
                was_first, first_line = first_line, False
                nul = b"\x00" in raw and _nul_problem(raw)
                if nul:
                    yield line_no, RecordError("json", nul)
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield line_no, RecordError("json", "not valid UTF-8")
                    continue
                except RecursionError:
                    yield line_no, RecordError("json", "nested too deeply")
                    continue
                except json.JSONDecodeError as e:
                    if was_first:
                        _whole_file_value(path, f)  # a pretty-printed object spans lines: say what it is
                    yield line_no, RecordError("json", f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if was_first:
                    _not_records(path, record, line_no)
                yield line_no, record
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e}); re-create or re-download it.") from None


def _whole_file_value(path, f):
    """Called when the first line of a non-array file is not JSON: a JSON object over several lines is
    either a wrapper of the records, or several pretty-printed objects (not JSONL); both get one line."""
    pos = f.tell()
    f.seek(0)
    try:
        value = json.loads(f.read().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # the first value is complete and spans lines
            raise DataError(f"{path}:{e.lineno}: several JSON values over several lines, one after another: "
                            "neither JSONL (one record per line) nor a JSON array; write one of those.") from None
        value = None
    except (UnicodeDecodeError, RecursionError):
        value = None
    f.seek(pos)
    _not_records(path, value, 1)
    if isinstance(value, dict):
        raise DataError(f"{path}: one JSON object over several lines, not JSONL (one record per line) or an "
                        "array of records; put it on one line or inside [ ].")


NEWLINE = b"\n"


def _array_records(path, data):
    """Records of a JSON array, one by one, with the line each starts on. A syntax error inside a record
    makes that record invalid; reading resumes at the next record, found as the next line that starts
    like the records do (same indentation, '{'), so the broken stretch is exactly one record. If records
    do not start lines (an array on one line), the file cannot be split and is refused."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{data.count(NEWLINE, 0, e.start) + 1}: not valid UTF-8.") from None
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line, record_start = text.count("\n", 0, pos) + 1, None
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{line}: the JSON array is not closed with ']' (truncated file?).")
        if text[pos] == "]":
            break
        indent = text[text.rfind("\n", 0, pos) + 1:pos]
        if record_start is None and not indent.strip():
            record_start = re.compile(r"\n" + re.escape(indent) + r"\{")
        try:
            record, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            nxt = record_start.search(text, pos + 1) if record_start else None
            if record_start is None:
                raise DataError(f"{path}:{getattr(e, 'lineno', line)}: invalid JSON ({where}) in an array whose "
                                "records do not start lines, so the records after it cannot be told apart or counted. "
                                "Fix the file, or write JSONL (one record per line).") from None
            nul = _nul_problem(text[pos:nxt.start() if nxt else len(text)])
            yield getattr(e, "lineno", line), RecordError("json", nul or f"invalid JSON ({where})")
            if nxt is None:
                return  # the broken record was the last one: nothing after it is a record
            line += text.count("\n", pos, nxt.start() + 1)
            pos = nxt.start() + 1
            continue
        yield line, record
        line += text.count("\n", pos, end)
        pos = end
    rest = text[pos + 1:]
    if rest.strip() and not rest.strip(" \t\r\n\x00"):
        raise DataError(f"{path}:{line}: {_nul_problem(rest)} (after the JSON array, which is complete).")
    if rest.strip():
        extra = line + rest[:len(rest) - len(rest.lstrip())].count("\n")
        raise DataError(f"{path}:{extra}: more data after the JSON array that ends on line {line}; a file holds "
                        "one array (files joined with cat? merge them: jq -s add a.json b.json > all.json). "
                        "JSONL needs one record object per line, not a list.")


# Formats by the key that identifies them, in the order they are tried (a record with `messages` and `text` is
# messages); alpaca is also recognised by `output`, prompt_completion by `prompt`.
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "chat_rounds": ("chat_rounds",),
               "alpaca": ("instruction", "output"), "prompt_completion": ("completion", "prompt"), "text": ("text",)}
FORMATS = tuple(FORMAT_KEYS)
# The keys each format needs (a table without one of these columns is refused before any row is read)
REQUIRED = {"messages": ("messages",), "sharegpt": ("conversations",), "chat_rounds": ("chat_rounds",),
            "alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"), "text": ("text",)}


def detect_format(record):
    if isinstance(record, dict):
        for fmt, keys in FORMAT_KEYS.items():
            if any(k in record for k in keys):
                return fmt
    return None


# What a column a format reads may hold, as Arrow types: text, a list (of messages, turns, pairs), or either.
TEXT, LIST, EITHER = "text", "a list", "text or a list of messages"
COLUMN_TYPES = {"instruction": TEXT, "input": TEXT, "output": TEXT, "system": TEXT, "text": TEXT,
                "prompt": EITHER, "completion": EITHER, "messages": LIST, "conversations": LIST,
                "chat_rounds": LIST, "history": LIST}
LIST_KEYS = ("messages", "conversations", "chat_rounds", "history")  # in tables also as JSON text (CSV cells)
# Column names whose meaning is a format's key: for the --columns suggestion when nothing fits
COLUMN_GUESSES = {
    "prompt": ("question", "query", "prompt", "instruction", "input", "problem", "request", "user", "human"),
    "completion": ("answer", "response", "completion", "output", "solution", "reply", "target", "assistant", "gpt"),
    "messages": ("conversation", "conversations", "dialog", "dialogue", "chat", "turns", "messages", "history"),
    "text": ("content", "document", "body", "passage", "article", "raw", "code", "sentence", "text"),
}


def columns_suggestion(keys):
    """A --columns value that would map these column names to a format, guessed from common names."""
    def find(kind, taken=()):
        for guess in COLUMN_GUESSES[kind]:
            for key in keys:
                if key not in taken and (key.lower() == guess or guess in key.lower()):
                    return key
        return None
    q = find("prompt")
    a = find("completion", (q,))
    if q and a:
        return f"{q}=prompt,{a}=completion"
    for kind in ("messages", "text"):
        if find(kind):
            return f"{find(kind)}={kind}"
    return "QUESTION_COLUMN=prompt,ANSWER_COLUMN=completion (or CONVERSATION_COLUMN=messages, TEXT_COLUMN=text)"


def no_format(keys, what="keys"):
    names = ", ".join(map(repr, keys)) or "none"
    typos = "".join(f"; {k!r}{near_miss(k)}" for k in keys if near_miss(k))
    return (f"{what} {names} fit no format (messages, conversations, chat_rounds, instruction+output, "
            f"prompt+completion, text); map yours with --columns, e.g. --columns {columns_suggestion(keys)}{typos}")


def _text(content, where):
    """Content as a string: a string, None, or a list of OpenAI-style text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, (dict, str)) for p in content):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise RecordError(where, f"unsupported content part {json.dumps(p)[:60]} (only text parts)")
        return "".join(parts)
    raise RecordError(where, f"content must be a string, got {type(content).__name__}")


# LLaMA-Factory v1's content parts ({"type": ..., "value": ...}) and the media kinds of any content part
V1_PARTS = ("text", "reasoning", "tool_call")
MEDIA_PARTS = {"image_url": "images", "image": "images", "video_url": "videos", "video": "videos",
               "audio_url": "audio", "audio": "audio", "input_audio": "audio", "file": "files"}


def has_parts(content):
    """A list of content parts that _text alone does not read: LLaMA-Factory v1's (value), or media parts."""
    return isinstance(content, list) and any(isinstance(p, dict) and ("value" in p or p.get("type") in MEDIA_PARTS)
                                             for p in content)


def content_parts(message, where):
    """LLaMA-Factory v1's content parts -> (text, the message with the turn's reasoning as reasoning_content,
    tool calls): text parts joined, reasoning parts the turn's reasoning, tool_call parts (a JSON string or an
    object with name and arguments) its tool calls. Media parts are refused, every kind named."""
    texts, reasoning, calls, media = [], [], [], []
    for j, p in enumerate(message["content"]):
        kind = p.get("type") if isinstance(p, dict) else None
        value = p.get("value", p.get(kind)) if isinstance(p, dict) else None
        if kind in MEDIA_PARTS:
            media.append(MEDIA_PARTS[kind])
        elif kind not in V1_PARTS:
            raise RecordError(f"{where}[{j}]", f"unknown content part {json.dumps(p)[:60]} (parts: "
                              f"{', '.join(V1_PARTS)}: LLaMA-Factory's {{\"type\": ..., \"value\": ...}})")
        elif kind == "tool_call":
            calls += _tool_calls(value, f"{where}[{j}].value")
        elif not isinstance(value, str):
            raise RecordError(f"{where}[{j}].value", f"a {kind} part's value must be a string")
        else:
            (texts if kind == "text" else reasoning).append(value)
    if media:
        raise RecordError(where, f"multimodal content ({', '.join(dict.fromkeys(media))}): this script trains "
                          "text-only models; drop the media parts or use a multimodal trainer")
    if (reasoning or calls) and message.get("role") != "assistant":
        raise RecordError(where, f"{'reasoning' if reasoning else 'tool_call'} parts belong to an assistant turn, "
                          f"not {message.get('role')!r}")
    if reasoning and message.get("reasoning_content"):
        raise RecordError(where, "reasoning given twice: as reasoning parts and as reasoning_content")
    return "".join(texts), {**message, "reasoning_content": "".join(reasoning)} if reasoning else message, calls


def _tools(tools):
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError("tools", "not valid JSON") from None
    if isinstance(tools, dict) and not {"name", "function"} & tools.keys():
        example = next(iter(tools), "")
        raise RecordError("tools", f"an object keyed by function name ({example!r}, ...); write a list of "
                          f'function schemas: [{{"name": "{example}", "description": ..., "parameters": ...}}, ...]')
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", "must be a list of function schemas")
    tools = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    for i, t in enumerate(tools):
        if not isinstance(t["function"], dict) or not isinstance(t["function"].get("name"), str):
            raise RecordError(f"tools[{i}]", "a function schema needs a name (and description, parameters)")
    return tools


def _tool_calls(calls, where):
    """OpenAI tool_calls or ShareGPT function_call payloads -> [{"type","function":{"name","arguments":dict}}]."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise RecordError(where, "function call is not valid JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(where, "each tool call needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # templates render arguments with tojson: a dict, not a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}.arguments", f"not valid JSON ({e.msg} at column {e.colno}): "
                                  f"{fn['arguments'][:60]!r}") from None
        if not isinstance(args, dict):
            raise RecordError(f"{where}.arguments", f"must be a JSON object (or a string holding one), got "
                              f"{type(args).__name__}")
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def _message(role, content, field_name, item=None, tool_calls=None):
    """One normalized message, checking what every format needs; errors name the record's own field
    (field_name: where the content is; item: the source turn, whose train/loss_weight/... are kept)."""
    content = _text(content, field_name)
    if tool_calls:
        msg = {"role": role, "content": content or "", "tool_calls": tool_calls}  # "": what templates expect
    elif content is None:
        raise RecordError(field_name, "missing or null (must be a string)")
    elif role == "assistant" and not content.strip():
        raise RecordError(field_name, "empty assistant reply")
    else:
        msg = {"role": role, "content": content}
    prefix = field_name.rsplit(".", 1)[0]
    for key in ("name", "tool_call_id", "reasoning_content", "train", "loss_weight", "weight"):
        if key in (item or {}):
            msg["loss_weight" if key == "weight" else key] = item[key]  # weight: OpenAI fine-tuning's 0/1
    if not isinstance(msg.get("train", True), bool):
        raise RecordError(f"{prefix}.train", "must be true or false")
    weight = msg.get("loss_weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RecordError(f"{prefix}.{'weight' if 'weight' in (item or {}) else 'loss_weight'}",
                          f"must be a finite number >= 0, got {weight!r}")
    return msg


def _message_list(msgs, field_name):
    if not isinstance(msgs, list) or not msgs:
        raise RecordError(field_name, "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(where, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}.role", f"unknown role {role!r} (expected {'/'.join(ROLES)})")
        if "content" not in m and not m.get("tool_calls"):
            raise RecordError(f"{where}.content", "missing")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        content = m.get("content")
        if has_parts(content):  # LLaMA-Factory v1: text, reasoning and tool_call parts
            content, m, part_calls = content_parts(m, f"{where}.content")
            calls = (calls or []) + part_calls or None
        out.append(_message(role, content, f"{where}.content", m, calls))
    return out


def _from_messages(record, tags=None):
    messages = _message_list(record["messages"], "messages")
    system = record.get("system")
    if system not in (None, ""):  # a system prompt beside the messages (as in sharegpt and chat_rounds records)
        if messages[0]["role"] == "system":
            raise RecordError("system", "given twice: as `system` and as the first message")
        messages = [_message("system", system, "system")] + messages
    return messages, _tools(record.get("tools"))


def _from_speakers(turns, list_field, speaker_key, text_key, system=None, tags=None):
    """ShareGPT-like turns. tags (LLaMA-Factory's role_tag, content_tag, user_tag, ...) name the keys and
    speakers exactly; without them, from/value or role/content and any speaker of SPEAKER_ROLES."""
    if not isinstance(turns, list) or not turns:
        raise RecordError(list_field, "must be a non-empty list")
    roles, calls_by = SPEAKER_ROLES, ("function_call",)
    if tags:
        roles = {tags[t]: r for t, r in (("user_tag", "user"), ("assistant_tag", "assistant"), ("system_tag", "system"),
                                          ("observation_tag", "tool"), ("function_tag", "assistant")) if tags.get(t)}
        calls_by = (tags.get("function_tag"),)
    out = [_message("system", system, "system")] if system not in (None, "") else []
    for i, t in enumerate(turns):
        where = f"{list_field}[{i}]"
        if not isinstance(t, dict):
            raise RecordError(where, "must be an object")
        sk, tk = (tags["role_tag"], tags["content_tag"]) if tags else \
            (speaker_key, text_key) if speaker_key in t or "role" not in t else ("role", "content")
        speaker = t.get(sk)
        role = roles.get(speaker)
        if role is None:
            raise RecordError(f"{where}.{sk}", f"unknown speaker {speaker!r} "
                              f"(expected one of {', '.join(sorted(roles))})")
        calls = _tool_calls(t.get(tk), f"{where}.{tk}") if speaker in calls_by else None
        if t.get("tool_calls"):  # OpenAI-style calls on a turn (e.g. a legacy function_call, read by read_keys)
            calls = (calls or []) + _tool_calls(t["tool_calls"], f"{where}.tool_calls")
            if not t.get(tk):
                t = {**t, tk: ""}
        out.append(_message(role, None if calls else t.get(tk), f"{where}.{tk}", t, calls))
    return out


def _from_sharegpt(record, tags=None):
    msgs = _from_speakers(record["conversations"], "conversations", "from", "value", record.get("system"), tags)
    return msgs, _tools(record.get("tools"))


def _from_chat_rounds(record, tags=None):
    return _from_speakers(record["chat_rounds"], "chat_rounds", "role", "content", record.get("system")), None


def _from_alpaca(record, tags=None):
    for key in ("instruction", "output", "input", "system"):
        optional = key in ("input", "system")
        if not isinstance(record.get(key), str) and not (optional and record.get(key) is None):
            raise RecordError(key, "missing or not a string" if not optional else "must be a string")
    msgs = [_message("system", record["system"], "system")] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "must be a [question, answer] pair of strings")
        msgs += [_message("user", pair[0], f"history[{i}][0]"), _message("assistant", pair[1], f"history[{i}][1]")]
    prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    msgs += [_message("user", prompt, "instruction"), _message("assistant", record["output"], "output",
                                                                 _answer_reasoning(record))]
    return msgs, _tools(record.get("tools"))


def _answer_reasoning(record):
    """The reasoning of a one-answer record (alpaca, prompt/completion), given beside it (read_keys names it
    reasoning_content), as the answer's own key."""
    return {"reasoning_content": record["reasoning_content"]} if record.get("reasoning_content") else None


def _turns(value, field_name, role):
    """One side of prompt/completion: a string (one `role` turn) or a list of messages."""
    if isinstance(value, str):
        return [_message(role, value, field_name)]
    if isinstance(value, list):
        return _message_list(value, field_name)
    raise RecordError(field_name, "missing or null" if value is None else
                      f"must be a string or a list of messages, got {type(value).__name__}")


def _from_prompt_completion(record, tags=None):
    """TRL's prompt/completion: strings are a user turn and an assistant turn; message lists (conversational) are
    the conversation, of which only the completion's assistant turns are trained."""
    prompt = [{**m, "train": False} if m["role"] == "assistant" else m
              for m in _turns(record.get("prompt"), "prompt", "user")]
    completion = _turns(record.get("completion"), "completion", "assistant")
    if record.get("reasoning_content"):
        if not isinstance(record.get("completion"), str):
            raise RecordError("reasoning_content", "beside a completion that is a list of messages: write it on "
                              "its assistant message")
        completion = [{**completion[0], **_answer_reasoning(record)}]
    if not any(m["role"] == "assistant" for m in completion):
        raise RecordError("completion", "no assistant turn (the completion is what is trained)")
    system = record.get("system")
    if system not in (None, ""):
        if any(m["role"] == "system" for m in prompt):
            raise RecordError("system", "given twice: as `system` and as a system message in `prompt`")
        prompt = [_message("system", system, "system")] + prompt
    return prompt + completion, _tools(record.get("tools"))


ADAPTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
            "chat_rounds": _from_chat_rounds, "prompt_completion": _from_prompt_completion}
MEDIA_KEYS = {"images": "images", "videos": "videos", "audios": "audio"}  # LLaMA-Factory's media keys: refused
RECORD_KEYS = ("messages", "conversations", "chat_rounds", "tools", "system", "source", "instruction", "input",
               "output", "history", "prompt", "completion", "text")
REQUIRED_KEY = {fmt: keys[0] for fmt, keys in REQUIRED.items()}


def near_miss(key, known=RECORD_KEYS):
    """' (did you mean ...)' for a key that is a typo of a known one ('mesages'), not one that extends it
    ('prompt_id', 'source_text'); else ''."""
    if key in known:
        return ""
    hint = suggest(key, known)
    close = hint and hint.split("'")[1]
    if hint and re.search(r"(^|_)" + re.escape(close) + r"(_|$)", key):
        return ""  # it extends the key it resembles ('source_text'), unlike 'reasoning_contnet' ('reasoning' is known)
    return hint


def _check_keys(record):
    media = [kind for key, kind in MEDIA_KEYS.items() if record.get(key)]
    if media:  # LLaMA-Factory's multimodal records: the media would be dropped without a word
        raise RecordError(next(k for k in MEDIA_KEYS if record.get(k)),
                          f"multimodal record ({', '.join(media)}): this script trains text-only models; drop the "
                          "media or use a multimodal trainer")


# ---------------------------------------------------------------------------------------------
# The ledger of keys: every key of a record, and of each of its messages, is read, read under another name, ignored
# by one rule, or reported; a key holding content is never ignored
# ---------------------------------------------------------------------------------------------
# One walk over every record of every format, before its adapter reads it (read_keys). A key is
# - read: a key of the record's format (FORMAT_READS, `source`) or of a message (MESSAGE_KEYS, LLaMA-Factory's tags);
# - read under another name: other ecosystems' names for the same thing (KEY_ALIASES, ROLE_ALIASES, --columns NAME=KEY
#   with KEY a message key), counted and said once in the log;
# - ignored by rule: identifiers and metadata (IGNORED_KEYS, any *_id), and a key whose value is empty (null, "", [],
#   {}: it holds nothing);
# - refused: a near-miss of a known key (a typo, with its did-you-mean), a key holding content that nothing reads
#   (UNREADABLE_KEYS; reasoning on a message that is not an assistant's), old and new function calling in one record;
# - reported: any other key, named once in the log with the number of records that have it and listed in
#   data_report.json (keys.not_read).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")  # DeepSeek/Qwen3, vLLM/Ollama, gpt-oss's cookbook
KEY_ALIASES = {"reasoning": "reasoning_content", "thinking": "reasoning_content",  # a message's reasoning
               "function_call": "tool_calls",  # OpenAI's legacy assistant function call
               "training": "train"}  # axolotl's per-message training flag
# (a record's `functions`, OpenAI's legacy function schemas, is read as its `tools`)
ROLE_ALIASES = {"developer": "system", "function": "tool"}  # OpenAI's newer name for system; its legacy tool result
IGNORED_KEYS = ("id", "uuid", "metadata", "meta", "timestamp", "created", "created_at", "model")
# Content that no template renders and no adapter reads: a record holding it is refused (the key, the fix).
UNREADABLE_KEYS = {
    "refusal": "an assistant's refusal text (OpenAI): nothing renders it; write it as the turn's content",
    "audio": "audio (OpenAI): this script trains text-only models; drop it or use a multimodal trainer",
    "train_detail": "axolotl's training offsets within a message: not supported; split the message, or train or "
                    "exclude it whole (train, weight)",
    "training_detail": "axolotl's training offsets within a message: not supported; split the message, or train or "
                       "exclude it whole (train, weight)",
}
# --message_names: what happens to the `name` of a message (a speaker: OpenAI's participants of one role)
NAME_MODES = ("render", "content", "drop")


def _empty(value):
    return value is None or value == "" or value == [] or value == {}


def message_columns(columns):
    """The --columns pairs that rename a message key (NAME=KEY, KEY a message key): {name: key}."""
    return {n: k for n, k in (columns or {}).items() if k in MESSAGE_KEYS and k not in RECORD_KEYS}


def _message_lists(record, fmt):
    """(field, list of message dicts) of a record: the lists whose items are messages or turns."""
    keys = {"messages": ("messages",), "sharegpt": ("conversations",), "chat_rounds": ("chat_rounds",),
            "prompt_completion": ("prompt", "completion")}.get(fmt, ())
    return [(k, record[k]) for k in keys if isinstance(record.get(k), list)]


class _Found:
    """What read_keys found in one record: each (kind, key) once per record, tallied into the data set's counts
    ({"read_as" | "ignored" | "not_read": {key: {"records": n, "first": "file:line"}}}) when the record is done."""

    def __init__(self, counts, at):
        self.counts, self.at, self.keys = counts, at, {}

    def add(self, kind, key):
        self.keys[(kind, key)] = True

    def tally(self):
        if self.counts is None:
            return
        for kind, key in self.keys:
            entry = self.counts.setdefault(kind, {}).setdefault(key, {"records": 0, "first": self.at})
            entry["records"] += 1


def _rename(item, renames, where, found):
    for name, key in renames.items():
        if name in item:
            if not _empty(item.get(key)):
                raise RecordError(f"{where}.{name}", f"--columns {name}={key}, but the message has {key!r} too; "
                                  "map or drop one")
            item[key] = item.pop(name)
            found.add("read_as", f"messages[].{name} -> {key} (--columns)")


def _read_message_keys(m, where, read, renames, names, found, calling, role_aliases):
    """One message (or turn) through the ledger, in place; `read`: the keys its adapter reads; role_aliases: those
    of OpenAI-style messages (ShareGPT's speakers have their own table, SPEAKER_ROLES)."""
    _rename(m, renames, where, found)
    legacy_call = False
    for key in list(m):
        value = m[key]
        if key in read:
            continue
        if key in KEY_ALIASES:
            target = KEY_ALIASES[key]
            m.pop(key)
            if _empty(value):
                continue
            if key == "function_call":
                legacy_call = True
                calling.setdefault("legacy", f"{where}.function_call")
                if not _empty(m.get("tool_calls")):
                    raise RecordError(f"{where}.function_call", "given with tool_calls in the same message: OpenAI's "
                                      "legacy function call and its tool calls mixed; write every call as tool_calls")
            elif not _empty(m.get(target)) and m[target] != value:
                raise RecordError(f"{where}.{key}", f"given twice, as {key!r} and as {target!r}; keep one")
            m[target] = value
            found.add("read_as", f"messages[].{key} -> {target}")
        elif key in IGNORED_KEYS or key.endswith("_id"):
            found.add("ignored", f"messages[].{key}")
        elif near_miss(key, MESSAGE_KEYS + tuple(KEY_ALIASES)):
            hint = near_miss(key, MESSAGE_KEYS + tuple(KEY_ALIASES))
            raise RecordError(f"{where}.{key}", f"unknown key{hint}; fix the name, or map it with --columns "
                              f"{key}={KEY_ALIASES.get(hint.split(chr(39))[1], hint.split(chr(39))[1])}")
        elif _empty(value):
            m.pop(key)
        elif key in UNREADABLE_KEYS:
            raise RecordError(f"{where}.{key}", UNREADABLE_KEYS[key])
        else:
            found.add("not_read", f"messages[].{key}")
    role = m.get("role")
    if role in role_aliases:
        m["role"] = role_aliases[role]
        found.add("read_as", f"role {role} -> {role_aliases[role]}")
        if role == "function":
            calling.setdefault("legacy", f"{where}.role")
    elif role == "tool" or not _empty(m.get("tool_calls")) and not legacy_call:
        calling.setdefault("new", f"{where}.{'role' if role == 'tool' else 'tool_calls'}")
    role = m.get("role") or SPEAKER_ROLES.get(m.get("from"))
    if not _empty(m.get("reasoning_content")) and role not in ("assistant", None):
        raise RecordError(f"{where}.reasoning_content", f"reasoning on a {role} message: only an assistant turn's "
                          "reasoning is rendered; move it to the assistant turn or drop it")
    if not _empty(m.get("name")) and role not in ("tool", None) and names != "render":
        name = m.pop("name")  # a tool result's name is the function it answers: linked to its call by tool_call_id
        if names == "content":
            _name_into_content(m, name)
        found.add("read_as", f"messages[].name -> {'content' if names == 'content' else 'dropped'} (--message_names)")


def _name_into_content(m, name):
    """--message_names content: 'NAME: ' written before the message's text (in the key its format keeps it)."""
    key = "content" if "content" in m or "value" not in m else "value"
    text = m.get(key)
    if isinstance(text, list):
        m[key] = [{"type": "text", "value" if has_parts(text) else "text": f"{name}: "}] + text
    else:
        m[key] = f"{name}: {text or ''}"


def read_keys(record, fmt, tags=None, renames=None, names="render", counts=None, at=None):
    """The record through the ledger (see above): a copy with every alias read under its known name, or RecordError.
    counts: the data set's tallies (normalized_rows keeps them in stats["keys"]); at: 'file:line', kept for the
    first record that has each key."""
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
    found, calling = _Found(counts, at), {} if _empty(record.get("tools")) else {"new": "tools"}
    record = dict(record)
    read = set(FORMAT_READS[fmt]) | {"source", *MEDIA_KEYS}
    for key in list(record):
        value = record[key]
        if key in read:
            continue
        if key == "functions":
            record.pop(key)
            if not _empty(value):
                calling["legacy"] = "functions"
                if not _empty(record.get("tools")):
                    raise RecordError("functions", "given with tools: OpenAI's legacy function schemas and its tools "
                                      "mixed; write every schema under tools")
                record["tools"] = value
                found.add("read_as", "functions -> tools")
        elif key in IGNORED_KEYS or key.endswith("_id"):
            found.add("ignored", key)
        elif near_miss(key):
            raise RecordError(key, f"unknown key{near_miss(key)}")
        elif _empty(value):
            record.pop(key)
        elif key in REASONING_KEYS and "reasoning_content" in read:  # the one answer's (alpaca, prompt/completion)
            if not _empty(record.get("reasoning_content")) and record["reasoning_content"] != value:
                raise RecordError(key, f"reasoning given twice, as {key!r} and as 'reasoning_content'; keep one")
            record["reasoning_content"] = record.pop(key)
            found.add("read_as", f"{key} -> reasoning_content")
        elif key in REASONING_KEYS:
            raise RecordError(key, f"reasoning at the top of a {fmt} record: it belongs to an assistant message; "
                              f"write it there as reasoning_content")
        elif key in UNREADABLE_KEYS:
            raise RecordError(key, UNREADABLE_KEYS[key])
        else:
            found.add("not_read", key)
    message_read = set(MESSAGE_KEYS) | ({(tags or {}).get("role_tag"), (tags or {}).get("content_tag")} - {None})
    for field, items in _message_lists(record, fmt):
        items = record[field] = [dict(m) if isinstance(m, dict) else m for m in items]
        for i, m in enumerate(items):
            if isinstance(m, dict):
                _read_message_keys(m, f"{field}[{i}]", message_read, renames or {}, names, found, calling,
                                   ROLE_ALIASES if fmt in ("messages", "prompt_completion") else {})
    if "legacy" in calling and "new" in calling:
        raise RecordError(calling["legacy"], "OpenAI's legacy function calling (functions, function_call, role "
                          f"function) mixed with tools (tools, tool_calls, role tool; here {calling['new']}) in one "
                          "record; write one form: functions -> tools, function_call -> tool_calls, role function -> "
                          "role tool")
    found.tally()
    return record


def normalize_record(record, fmt, tags=None, need_answer=True, **ledger):
    """Any supported record -> (messages, tools), or RecordError naming the field and the problem. need_answer
    False: a conversation without an assistant turn is a prompt (retention's reference set, finetune_retention.py).
    ledger: read_keys' renames, names, counts, at."""
    record = read_keys(record, fmt, tags, **ledger)
    _check_keys(record)
    if REQUIRED_KEY[fmt] not in record:
        raise RecordError(REQUIRED_KEY[fmt], f"missing (file read as {fmt} format)")
    messages, tools = ADAPTERS[fmt](record, tags)
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants and not need_answer:
        return messages, tools
    if not assistants:
        raise RecordError(REQUIRED_KEY[fmt], "no assistant turn to train on")
    if not any(is_trained(m) for m in assistants):
        raise RecordError(REQUIRED_KEY[fmt], "every assistant turn is excluded (train: false / loss_weight: 0)")
    return messages, tools


def normalize_text(record, **ledger):
    """The text format -> the text (plain text: no chat template, every token trained)."""
    record = read_keys(record, "text", **ledger)
    _check_keys(record)
    text = record.get("text")
    if not isinstance(text, str):
        raise RecordError("text", "missing or null (file read as text format)" if text is None else
                          f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RecordError("text", "empty")
    return text


def is_trained(message):
    return message.get("train", True) is not False and message.get("loss_weight", 1) != 0


def invalid_reason(error):
    """'messages[3].role: unknown role 'x' (expected ...)' -> 'messages[].role: unknown role 'x'': the key
    under which the report counts invalid records."""
    return re.sub(r"\[\d+\]", "[]", error.split(" (")[0])


def tally(counter, key, n=1):
    counter[key] = counter.get(key, 0) + n


# ---------------------------------------------------------------------------------------------
# Tables (Parquet, Arrow, CSV/TSV) and plain text, row by row
# ---------------------------------------------------------------------------------------------

# The keys each format reads (and `source`): the only columns read from a table
FORMAT_READS = {"messages": ("messages", "system", "tools"), "sharegpt": ("conversations", "system", "tools"),
                "chat_rounds": ("chat_rounds", "system"), "alpaca": ("instruction", "input", "output", "system",
                                                                     "history", "tools", "reasoning_content"),
                "prompt_completion": ("prompt", "completion", "system", "tools", "reasoning_content"),
                "text": ("text",)}


def file_kind(path):
    """json | parquet | arrow | csv | tsv | txt, by the file's name; None for other files."""
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    return next((kind for suffix, kind in KINDS.items() if name.endswith(suffix)), None)


def rename(keys, columns, only=False):
    """{name: key} for a record's keys or a table's columns: --columns (or a dataset_info.json entry's columns)
    applied (those naming a message key rename inside the messages: read_keys); with `only`, names not mapped are
    not read (LLaMA-Factory's dataset_info.json columns: the entry says what is read). Two names becoming one key is
    an error."""
    columns = {n: k for n, k in columns.items() if n not in message_columns(columns)}
    out, taken = {}, {}
    for name in keys:
        key = columns.get(name, None if only else name)
        if key is None:
            continue
        if key in taken:
            raise RecordError("columns", f"{taken[key]!r} and {name!r} would both be {key!r}"
                              + (" (--columns)" if columns else "") + "; map or drop one")
        taken[key], out[name] = name, key
    return out


def _arrow_type_problem(key, t):
    """Why an Arrow column of type t cannot be the format's `key`, or None."""
    import pyarrow as pa

    def is_text(t):
        return (pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t)
                or pa.types.is_dictionary(t) and is_text(t.value_type))

    def is_list(t):
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    want = COLUMN_TYPES.get(key)
    if want is None or pa.types.is_null(t) or is_text(t) and want != LIST or is_list(t) and want != TEXT:
        return None
    if is_text(t) and want == LIST:
        return None  # a list as JSON text (what a CSV export holds): parsed per row
    return f"holds {t}, but the {key!r} of a record must be {want}"


def _holds_media(t):
    """An Arrow type that stores files the way datasets' Image, Audio and Video features do (a struct of bytes
    and path), or a list of them."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        return {t.field(i).name for i in range(t.num_fields)} >= {"bytes", "path"}
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _holds_media(t.value_type)


def _media_kinds(schema):
    """{column: "image" | "audio" | "video"} from the datasets features a file's schema carries, if any."""
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    kinds = {}
    for name, feature in features.items():
        while isinstance(feature, dict) and "feature" in feature:  # List / Sequence of a feature
            feature = feature["feature"]
        if isinstance(feature, dict) and feature.get("_type") in ("Image", "Audio", "Video"):
            kinds[name] = feature["_type"].lower()
    return kinds


def _has_struct(t):
    import pyarrow as pa

    if pa.types.is_struct(t):
        return True
    return any(_has_struct(t.field(i).type) for i in range(t.num_fields)) if hasattr(t, "num_fields") else False


class _TablePlan:
    """How a table's rows become records: which columns are read, under which keys; values of nested columns
    lose their null fields (an Arrow struct has every key of every row: a missing key reads as null), and a
    list key given as text is parsed as JSON. Refuses, in one line, a table whose columns fit no format, lack one
    the format needs, or hold the wrong type."""

    def __init__(self, path, types, options, fmt, media_kinds=None):
        for name, t in types.items():
            if t is not None and _holds_media(t):  # datasets' Image/Audio/Video columns: bytes + path structs
                kind = (media_kinds or {}).get(name) or "media"
                raise DataError(f"{path}: column {name!r} holds multimodal data ({kind}: files as bytes and path): "
                                "this script trains text-only models; drop the column or use a multimodal trainer.")
        try:
            mapping = rename(types, options.get("columns") or {}, options.get("only", False))
        except RecordError as e:
            raise DataError(f"{path}: {e}") from None
        keys = list(mapping.values())
        absent = [f"{n}={k}" for n, k in (options.get("columns") or {}).items() if n not in types]
        absent = f" (the mapping {', '.join(absent)} names no column of this table)" if absent else ""
        fmt = fmt or detect_format(dict.fromkeys(keys))
        if fmt is None:
            raise DataError(f"{path}: {no_format(list(types), 'columns')}{absent}")
        for key in keys:
            if near_miss(key):
                raise DataError(f"{path}: column {key!r}: unknown key{near_miss(key)}; rename it (--columns "
                                f"{key}={near_miss(key).split(chr(39))[1]}) or drop it")
        missing = [k for k in REQUIRED[fmt] if k not in keys]
        if missing:
            how = ("the entry's columns in its dataset_info.json" if options.get("label") else
                   f"--columns NAME={missing[0]}")
            raise DataError(f"{path}: no column {missing[0]!r}: the {fmt} format needs {' and '.join(REQUIRED[fmt])} "
                            f"(columns: {', '.join(types)}); map one with {how}{absent}")
        self.names = list(mapping)  # every column: the ledger (read_keys) reads, maps, ignores or names each
        self.keys = [mapping[n] for n in self.names]
        for name, key in zip(self.names, self.keys):
            problem = types[name] is not None and _arrow_type_problem(key, types[name])
            if problem:
                via = f" (--columns {name}={key})" if name != key else ""
                raise DataError(f"{path}: column {name!r}{via} {problem}.")
            if key in REQUIRED[fmt] and types[name] is not None and str(types[name]) == "null":
                raise DataError(f"{path}: column {name!r} is null in every row: no {key}.")
        self.fmt = fmt
        self.nested = [i for i, n in enumerate(self.names) if types[n] is not None and _has_struct(types[n])]
        self.parsed = [i for i, k in enumerate(self.keys) if k in LIST_KEYS]

    def record(self, values):
        values = list(values)
        for i in self.nested:
            values[i] = _drop_nulls(values[i])
        for i in self.parsed:
            if isinstance(values[i], str):
                try:
                    values[i] = json.loads(values[i])
                except json.JSONDecodeError as e:
                    return RecordError(self.keys[i], f"text that is not a JSON list ({e.msg} at column {e.colno}); "
                                       "a list in a table cell is written as JSON")
        return dict(zip(self.keys, values))


def _drop_nulls(value):
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _arrow_records(path, kind, options, fmt, seen):
    """Rows of a Parquet file or an Arrow IPC file (file or stream format: save_to_disk and datasets' cache
    write streams), read batch by batch, only the columns the format uses."""
    import pyarrow as pa

    what = "Parquet" if kind == "parquet" else "Arrow"
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path, memory_map=True)
            schema, batches = table.schema_arrow, lambda cols: table.iter_batches(batch_size=1024, columns=cols)
        else:
            source = pa.memory_map(path)
            try:
                reader = pa.ipc.open_file(source)
                schema = reader.schema
                batches = lambda cols: (reader.get_batch(i).select(cols) for i in range(reader.num_record_batches))  # noqa: E731
            except pa.ArrowInvalid:
                source.seek(0)
                stream = pa.ipc.open_stream(source)
                schema, batches = stream.schema, lambda cols: (b.select(cols) for b in stream)
        seen.update(schema.names)
        twice = sorted({n for n in schema.names if schema.names.count(n) > 1})
        if twice:
            raise DataError(f"{path}: the column {twice[0]!r} appears twice; column names must be unique.")
        plan = _TablePlan(path, {n: schema.field(n).type for n in schema.names}, options, fmt, _media_kinds(schema))
        row = 0
        for batch in batches(plan.names):
            for values in zip(*(column.to_pylist() for column in batch.columns)):
                row += 1
                yield f"row {row}", plan.record(values)
    except (pa.ArrowException, OSError) as e:
        at = f" after row {row}" if "row" in locals() else ""
        raise DataError(f"{path}: not a readable {what} file{at} ({' '.join(str(e).split())[:200]}); re-create or "
                        "re-download it.") from None


def _csv_records(path, kind, options, fmt, seen):
    """Rows of a CSV/TSV file (RFC 4180: quoted fields may hold the delimiter, quotes and newlines; a BOM is
    skipped). Every value is text; a row with another number of fields than the header is an invalid record."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # chat data has long cells; the default limit is 128 KiB
    delimiter = options.get("delimiter") or ("\t" if kind == "tsv" else ",")
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    head = raw.read(4096)
    raw.seek(0)
    encoding = next((enc for bom, enc in ENCODINGS.items() if head.startswith(bom)), None) or _wide_encoding(head)
    if encoding:
        raw.close()
        raise DataError(f"{path}: text encoded as {encoding}, not UTF-8; convert it, e.g. iconv -f {encoding} -t "
                        f"UTF-8 {path} > {path}.utf8")
    def lines():  # decoded one line at a time, so that bad UTF-8 is named by its line
        for line_no, line in enumerate(raw, 1):
            try:
                yield line.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_no}: not valid UTF-8; convert it, e.g. iconv -f latin1 -t UTF-8 "
                                f"{path} > {path}.utf8") from None

    with raw:
        reader = csv.reader(lines(), delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: {'empty file' if header is None else 'the first line is blank'}: no header.")
            if len(header) == 1 and any(d in header[0] for d in ";\t|") and delimiter not in header[0]:
                other = next(d for d in ";\t|" if d in header[0])
                raise DataError(f"{path}: the header is one field, {header[0]!r}: the fields seem separated by "
                                f"{other!r}, not {delimiter!r}; write it comma-separated (.csv) or "
                                "tab-separated (.tsv).")
            twice = sorted({n for n in header if header.count(n) > 1})
            if twice:
                raise DataError(f"{path}: the header names {twice[0]!r} twice; column names must be unique.")
            seen.update(header)
            plan = _TablePlan(path, dict.fromkeys(header), options, fmt)
            index = [header.index(n) for n in plan.names]
            row = 0
            for fields in reader:
                if not fields:
                    continue  # a blank line
                row += 1
                if len(fields) != len(header):
                    yield f"row {row}", RecordError("csv", f"{len(fields)} fields where the header has {len(header)} "
                                                    f"(line {reader.line_num}; a {delimiter!r} inside a field must be "
                                                    "quoted)")
                    continue
                nul = any("\x00" in x for x in fields) and _nul_problem("".join(fields))
                yield f"row {row}", RecordError("csv", nul) if nul else plan.record(fields[i] for i in index)
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid {kind.upper()} ({e}; a quote inside a quoted "
                            "field is written twice: \"\")") from None


def _text_lines(path):
    """A .txt file: one text per non-blank line (datasets' text builder), numbered by line."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n").removeprefix(b"\xef\xbb\xbf" if line_no == 1 else b"")
            if not raw.strip():
                continue
            nul = b"\x00" in raw and _nul_problem(raw)
            try:
                yield line_no, RecordError("text", nul) if nul else {"text": raw.decode("utf-8")}
            except UnicodeDecodeError:
                yield line_no, RecordError("text", "not valid UTF-8")


def read_records(path, options=None, fmt=None, seen=None):
    """Yield (where, record or RecordError) from any data file, by its name: JSON/JSONL and .txt (where = the
    line), Parquet/Arrow/CSV/TSV (where = 'row N', N counting the rows from 1, a CSV header not counted).
    options: columns ({name: key}) and only (read only mapped names), delimiter. fmt: the format if known
    (tables check their columns against it, or detect it from the column names). seen: collects the names."""
    options, seen = options or {}, seen if seen is not None else set()
    kind = file_kind(path)
    if kind in ("parquet", "arrow"):
        yield from _arrow_records(path, kind, options, fmt, seen)
        return
    if kind in ("csv", "tsv"):
        yield from _csv_records(path, kind, options, fmt, seen)
        return
    columns, only = options.get("columns") or {}, options.get("only", False)
    for where, record in _text_lines(path) if kind == "txt" else read_json_records(path):
        if isinstance(record, dict):
            seen.update(record)  # the names an unused --columns NAME is checked against
        if (set(columns) - set(message_columns(columns)) or only) and isinstance(record, dict):
            try:
                record = {key: record[name] for name, key in rename(record, columns, only).items()}
            except RecordError as e:
                record = e
        yield where, record


# ---------------------------------------------------------------------------------------------
# All entries -> validated rows; the held-out split
# ---------------------------------------------------------------------------------------------


PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def parse_placeholders(spec):
    """--placeholders name=Foo,author=Bar -> {"name": "Foo", "author": "Bar"} ('\\,' is a comma in a value)."""
    out = {}
    for item in re.split(r"(?<!\\),", spec or ""):
        if not item.strip():
            continue
        name, sep, value = item.replace("\\,", ",").partition("=")
        name = name.strip().strip("{}")
        if not sep or not re.fullmatch(r"\w+", name):
            raise ValueError(f"--placeholders {spec}: {item.strip()!r} is not NAME=VALUE (e.g. --placeholders "
                             "name=Aria,author=Acme: every {{name}} in the data becomes Aria).")
        if name in out:
            raise ValueError(f"--placeholders {spec}: {name!r} is given twice.")
        out[name] = value
    return out


def fill_placeholders(conversation, values, where, found):
    """Every {{NAME}} of --placeholders (values) replaced in the texts and reasoning of a normalized record; the
    placeholders left in what is trained (trained assistant turns; a text record) counted in `found`
    ({"records", "by_name", "first", "filled"})."""
    def sub(m):
        if m.group(1) not in values:
            return m.group(0)
        tally(found["filled"], m.group(1))
        return values[m.group(1)]

    def fill(text):
        return PLACEHOLDER.sub(sub, text) if values and isinstance(text, str) and "{{" in text else text

    trained = []
    if "text" in conversation:
        conversation["text"] = fill(conversation["text"])
        trained.append(conversation["text"])
    for m in conversation.get("messages") or ():
        for key in ("content", "reasoning_content"):
            if key in m:
                m[key] = fill(m[key])
        if m["role"] == "assistant" and is_trained(m):
            trained += [m.get("content") or "", m.get("reasoning_content") or ""]
    names = [n for t in trained if "{{" in t for n in PLACEHOLDER.findall(t)]
    if names:
        found["records"] += 1
        found["first"] = found["first"] or where
        for n in names:
            tally(found["by_name"], n)
    return conversation


def normalized_rows(entries, data_format, skip_invalid, stats, placeholders=None, need_answer=True,
                    message_names="render"):
    """Generator for datasets.Dataset.from_generator: reads every file, validates, normalizes. Without
    --skip_invalid_records the first invalid record stops the output but not the reading: every file is
    still validated so that the error names the total count. need_answer: see normalize_record."""
    errors, n_invalid, seen = {}, 0, set()  # errors: problem -> [records with it, their first locations, its text]
    stats.setdefault("placeholders", {"records": 0, "by_name": {}, "first": None, "filled": {}})
    counts = stats.setdefault("keys", {})  # the ledger's: read_as, ignored, not_read

    def fail(last=None, stopped=False):
        lines = [error_line(text, n, where) for n, where, text in errors.values()] + ([last] if last else [])
        shown = sum(n for n, _, _ in errors.values())
        if stopped and n_invalid:
            lines.append(f"(reading stopped there: at least {n_invalid} invalid records in all)")
        elif n_invalid > shown:
            lines.append(f"({n_invalid} invalid records in all; the first {shown} are shown)")
        raise DataError("\n".join(lines))

    for entry_idx, entry in enumerate(entries):
        options = entry.options
        for file, source in entry.files:
            fmt = options.get("format") or (None if data_format == "auto" else data_format)
            fstats = {"records": 0, "invalid": 0, "samples": 0, "truncated": 0, "dropped": 0}
            stats["files"][file] = fstats
            try:
                for where, record in read_records(file, options, fmt, seen):
                    fstats["records"] += 1
                    try:
                        if isinstance(record, RecordError):
                            raise record
                        if not isinstance(record, dict):
                            raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
                        fmt = fmt or detect_format(record)
                        if fmt is None:
                            raise RecordError("record", no_format(list(record)))
                        fstats["format"] = fmt
                        ledger = {"renames": message_columns(options.get("columns")), "names": message_names,
                                  "counts": counts, "at": f"{file}:{where}"}
                        conversation = {"text": normalize_text(record, **ledger)} if fmt == "text" else \
                            dict(zip(("messages", "tools"),
                                     normalize_record(record, fmt, options.get("tags"), need_answer, **ledger)))
                        conversation = fill_placeholders(conversation, placeholders, f"{file}:{where}",
                                                         stats["placeholders"])
                    except RecordError as e:
                        fstats["invalid"] += 1
                        n_invalid += 1
                        tally(stats["invalid"], invalid_reason(str(e)))
                        problem = re.sub(r"\[\d+\]", "[]", str(e))  # messages[2].x and messages[5].x: one problem
                        if not skip_invalid and (problem in errors or len(errors) < 20):  # 20 problems at most
                            same = errors.setdefault(problem, [0, [], str(e)])
                            same[0] += 1
                            if len(same[1]) < 6:
                                same[1].append((file, where))
                        continue
                    if not errors:
                        stats["rows"] += 1
                        yield {"conversation": json.dumps(conversation, ensure_ascii=False),
                               "source": str(record.get("source") or source), "origin": f"{file}:{where}",
                               "entry": entry_idx}
            except DataError as e:  # the file as a whole: reading stops, so the count is a lower bound
                fail(str(e), stopped=True)
            if fstats["records"] == 0:
                fail(f"{file}: no records (an empty {'JSON array' if file_kind(file) == 'json' else 'table'}).",
                     stopped=True)
    for entry in entries:
        mapped = counts.get("read_as", {})
        unused = [f"{n}={k}" for n, k in (entry.options.get("columns") or {}).items()
                  if n not in seen and f"messages[].{n} -> {k} (--columns)" not in mapped]
        if unused and not entry.options.get("label"):
            message_keys = sorted(k for k in counts.get("not_read", {}) if k.startswith("messages[]."))
            fail(f"--columns {unused[0]}: no data file has a column or key {unused[0].split('=')[0]!r} (found: "
                 f"{', '.join(sorted(seen)[:20] + message_keys[:20])}).")
    if errors:
        fail()


def error_line(problem, n, where):
    """One line for the n records with the same problem: the first `path:line: field: problem`, then where the next
    few are (a whole file of media records, a key misspelt in every record: one line, not one per record)."""
    (file, first), rest = where[0], where[1:]
    line = f"{file}:{first}: {problem}"
    if n > 1:
        rest = ", ".join(str(w) if f == file else f"{f}:{w}" for f, w in rest) + (", ..." if n > len(where) else "")
        line += f" (and {n - 1} more record{'s' if n > 2 else ''} like it: {rest})"
    return line


def held_out_counts(sizes, val_size):
    """--val_size (a fraction < 1, or a whole number of samples) over sources of `sizes` samples -> how many each
    source gives to the held-out split: the total spread in proportion to the sources' sizes (largest remainder),
    every source keeping at least one training sample."""
    n = sum(sizes)
    total = int(val_size * n + 0.5) if val_size < 1 else int(val_size)
    if total < 1:
        raise DataError(f"--val_size {val_size:g} holds out no sample of {n}; give at least {1 / n:.3g}, or a whole "
                        "number of samples.")
    if total > n - len(sizes):
        raise DataError(f"--val_size {val_size:g} would hold out {total} of {n} samples, leaving too few to train on "
                        f"({len(sizes)} sources must keep one each).")
    exact = [total * s / n for s in sizes]
    counts = [min(int(x), s - 1) for x, s in zip(exact, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: (counts[i] - exact[i], i))  # largest shortfall first
    while sum(counts) < total:
        for i in [i for i in order if counts[i] < sizes[i] - 1][: total - sum(counts)]:
            counts[i] += 1
    return counts


def held_out_split(keep, sources, val_size, seed):
    """keep: sample indices, sources: their source names -> (training indices, held-out indices), per source,
    at random for this seed (the same split on every run with the same data and seed)."""
    keep, sources = np.asarray(keep), np.asarray(sources)
    names = sorted(set(sources.tolist()))
    counts = held_out_counts([int((sources == s).sum()) for s in names], val_size)
    rng = np.random.default_rng(seed)
    held = np.sort(np.concatenate([rng.permutation(keep[sources == s])[:c] for s, c in zip(names, counts)]))
    return np.setdiff1d(keep, held), held


def sample_indices(entry_col, keep, entries, seed):
    """Per-entry sampling ratios: <1 takes a random subset, >1 repeats (whole copies + a random rest).
    An entry left with no sample is an error: a source must not vanish without a word."""
    entry_col = np.asarray(entry_col)[keep]
    rng, out = np.random.default_rng(seed), []
    for e, entry in enumerate(entries):
        idx = keep[entry_col == e]
        count = entry.options.get("num_samples")  # dataset_info.json's num_samples: that many samples
        ratio = entry.ratio * (count / len(idx) if count and len(idx) else 1)
        whole, frac = int(ratio), ratio - int(ratio)
        out += [idx] * whole + [rng.permutation(idx)[: int(round(len(idx) * frac))]]
        if sum(len(i) for i in out[-whole - 1:]) == 0:
            raise DataError(f"{entry.options.get('label') or '--data_path entry ' + entry.path}:{ratio:g} keeps no "
                            f"sample of its {len(idx)}"
                            + (f"; use a ratio of at least {1 / len(idx):.3g}" if len(idx) else
                               " (all its records are invalid or dropped)") + ".")
    return np.sort(np.concatenate(out)) if out else keep
