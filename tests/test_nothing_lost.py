"""Nothing the data holds is lost on its way to the tokens (issue 24, points 3-6), on real tokenizers
(../shared/tokenizers) and real files: long texts split into blocks that keep every token (--long_text) and the
token accounting of the data report and log; unfilled {{placeholders}} flagged once and filled with
--placeholders; LLaMA-Factory's v1 format (content parts text/reasoning/tool_call, the tools column, its .yaml
dataset files); short exact messages (close entry names only, every media kind, Hub-only entries, LLaMA-Factory's
flag names)."""

import csv
import json
from pathlib import Path

import pytest

from conftest import SHARED, write_jsonl
from test_bad_input import dry_run_args, run_main, user_error
from test_base_model import make_base_model
from test_data_sources import build

DATA = SHARED / "data"
WIKI = Path(__file__).parent / "data" / "wiki_demo_3.txt"  # three documents of LLaMA-Factory's wiki_demo.txt


@pytest.fixture(scope="module")
def llama_spm(tmp_path_factory):
    """A tiny random Llama with the real Llama-2 SentencePiece tokenizer (it adds <s>; </s> is its eos)."""
    return str(make_base_model("llama-spm", tmp_path_factory.mktemp("models") / "llama-spm"))


def report_of(tmp_path):
    return json.loads((tmp_path / "out" / "data_report.json").read_text())


# ------------------------------------------------------------------------------------------------
# Point 3: long texts keep every token; the tokens read, trained and lost are reported
# ------------------------------------------------------------------------------------------------


def test_long_texts_are_split_into_blocks_that_keep_every_token(llama_spm, tmp_path):
    docs = WIKI.read_text(encoding="utf-8").splitlines()
    ds, report, tok, _ = build(llama_spm, tmp_path, str(WIKI), "--model_max_length", "256")
    whole = [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]  # what one unlimited sample would hold
    assert all(len(w) > 256 for w in whole) and tok.bos_token_id == whole[0][0]
    blocks = ds["input_ids"]
    assert sum(blocks, []) == sum(whole, [])  # every token of every document, once, in order
    assert all(len(b) <= 256 for b in blocks) and len(blocks) == sum(-(-len(w) // 256) for w in whole)
    starts = [i for i, b in enumerate(blocks) if b[0] == tok.bos_token_id]
    ends = [i for i, b in enumerate(blocks) if b[-1] == tok.eos_token_id]
    assert len(starts) == len(ends) == len(docs) and starts[0] == 0 and ends[-1] == len(blocks) - 1  # BOS 1st, EOS last
    assert ds["labels"] == blocks  # text: every token trained
    acc = report["token_accounting"]
    assert acc["read"] == acc["in_samples"] == sum(map(len, whole)) and acc["lost_to_truncation"] == 0
    assert (acc["long_texts_split"], acc["blocks"], report["truncated"]) == (3, len(blocks), 0)
    assert acc["trained"] == sum(len(b) - 1 for b in blocks) and list(acc["by_format"]) == ["text"]


def test_cut_and_conversations_say_the_tokens_truncation_lost(llama_spm, tmp_path, monkeypatch, capsys):
    chats = [{"messages": [{"role": "user", "content": "Tell me about it."},
                           {"role": "assistant", "content": doc},
                           {"role": "user", "content": "More?"}, {"role": "assistant", "content": doc}]}
             for doc in WIKI.read_text(encoding="utf-8").splitlines()[:2]]
    data = f"{WIKI},{write_jsonl(tmp_path / 'chats.jsonl', chats)}"
    code, log = run_main(dry_run_args(llama_spm, data, tmp_path, "--model_max_length", "512", "--long_text", "cut"),
                         monkeypatch, capsys)
    assert code == 0, log[-3000:]
    acc = report_of(tmp_path)["train"]["token_accounting"]
    text, conv = acc["by_format"]["text"], acc["by_format"]["messages"]
    assert text["samples_truncated"] == 2 and text["lost_to_truncation"] == text["read"] - text["in_samples"] > 0
    assert conv["samples_truncated"] == 2 and conv["lost_to_truncation"] > 0  # the second turn did not fit
    assert acc["read"] == acc["in_samples"] + acc["lost_to_truncation"] + acc["in_dropped_records"]
    line = next(x for x in log.splitlines() if "tokens read" in x)
    assert f"{acc['lost_to_truncation']:,} lost to truncation (4 samples cut" in line
    assert f"messages {conv['lost_to_truncation']:,}, text {text['lost_to_truncation']:,}" in line
    code, log = run_main(dry_run_args(llama_spm, str(WIKI), tmp_path, "--model_max_length", "512"), monkeypatch, capsys)
    assert code == 0 and "0 lost to truncation" in log and "2 long texts split into 4 blocks, every token kept" in log


# ------------------------------------------------------------------------------------------------
# Point 4: unfilled {{placeholders}} are flagged once; --placeholders fills them
# ------------------------------------------------------------------------------------------------


def test_identity_placeholders_are_flagged_once_and_filled(smollm2, tmp_path, monkeypatch, capsys):
    identity = str(DATA / "identity.json")  # LLaMA-Factory's: 85 of 91 answers carry {{name}}/{{author}}
    code, log = run_main(dry_run_args(smollm2, identity, tmp_path), monkeypatch, capsys)
    assert code == 0, log[-3000:]
    warnings = [x for x in log.splitlines() if "warning" in x]
    assert warnings == [f"[finetune] warning: 85 records train unfilled placeholders ({{{{name}}}} 77 times, "
                        f"{{{{author}}}} 60 times), the first at {identity}:2: fill them with --placeholders "
                        "name=...,author=..., or edit the data"]
    assert report_of(tmp_path)["train"]["placeholders"]["records"] == 85
    code, log = run_main(dry_run_args(smollm2, identity, tmp_path, "--placeholders", "name=Aria", "--placeholders",
                                      "author=Acme\\, Inc.", "--show_masking", "91"), monkeypatch, capsys)
    assert code == 0 and "warning" not in log and "{{" not in log, log[-3000:]
    assert "[[Hello! I am Aria, an AI assistant developed by Acme, Inc.. How can I assist you today?" in log
    code, log = run_main(dry_run_args(smollm2, identity, tmp_path, "--placeholders", "name=Aria,nme=X"), monkeypatch,
                         capsys)
    assert "records train unfilled placeholders ({{author}} 60 times), the first at" in log
    assert "warning: --placeholders nme: no {{nme}} in the data (placeholders are written {{NAME}})" in log
    code, log = run_main(dry_run_args(smollm2, identity, tmp_path, "--placeholders", "nmae=Aria,author=Acme"),
                         monkeypatch, capsys)  # a typo of a placeholder the data holds
    assert "warning: --placeholders nmae: no {{nmae}} in the data (did you mean 'name'?)" in log, log[-3000:]
    assert "'author' is not NAME=VALUE" in user_error(dry_run_args(smollm2, identity, tmp_path, "--placeholders",
                                                                   "author"), monkeypatch, capsys)


# ------------------------------------------------------------------------------------------------
# Point 5: LLaMA-Factory's v1 format and its .yaml dataset files
# ------------------------------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def v1_tool_record(city, temp, call_as_object=False):
    """Shaped like LLaMA-Factory's reason_tool_use_demo_50.jsonl: text, reasoning and tool_call parts, tools as a
    JSON string."""
    call = {"name": "get_weather", "arguments": {"city": city}}
    return {"messages": [
        {"role": "system", "content": [{"type": "text", "value": "You answer with tools."}]},
        {"role": "user", "content": [{"type": "text", "value": f"Weather in {city}?"}]},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": f"I should look up {city}."},
            {"type": "tool_call", "value": call if call_as_object else json.dumps(call)}]},
        {"role": "tool", "content": [{"type": "text", "value": json.dumps({"temp": temp})}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "Now report it."},
                                          {"type": "text", "value": f"It is {temp} degrees in {city}."}]}],
        "tools": json.dumps(TOOLS)}


def make_v1_dir(root):
    """LLaMA-Factory's layout: ROOT/data/ holds the files and a .yaml whose paths start with data/ (relative to
    where LLaMA-Factory runs, the folder above data/), shaped like its v1_sft_demo.yaml."""
    data = Path(root) / "data"
    data.mkdir(parents=True)
    write_jsonl(data / "tools_v1.jsonl", [v1_tool_record("Oslo", 3), v1_tool_record("Lima", 19, True)])
    write_jsonl(data / "chat_v1.jsonl", [  # shaped like v1_sft_demo.jsonl
        {"messages": [{"role": "user", "content": [{"type": "text", "value": f"hi {i}"}], "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "text", "value": f"Hello {i}!"}], "loss_weight": 1.0}]}
        for i in range(4)])
    (data / "identity.json").symlink_to(DATA / "identity.json")
    (data / "mine.yaml").write_text("tools_v1:\n  path: data/tools_v1.jsonl\n  source: local\n"
                                    "chat_v1:\n  path: data/chat_v1.jsonl\n  source: local\n  size: 6\n"
                                    "identity:\n  path: data/identity.json\n  source: local\n  converter: alpaca\n"
                                    "  size: 10\n")
    (data / "pairs.yaml").write_text("dpo:\n  path: HuggingFaceH4/orca_dpo_pairs\n  split: train_prefs\n"
                                     "  converter: pair\n")
    return data


def test_v1_parts_become_reasoning_and_tool_calls(smollm2, tmp_path, monkeypatch, capsys):
    data = make_v1_dir(tmp_path / "lf")
    qwen3 = SHARED / "templates" / "Qwen-Qwen3-0.6B.jinja"  # renders tools, tool calls and the last turns' reasoning
    code, log = run_main(dry_run_args(smollm2, f"{data}/mine.yaml[tools_v1]", tmp_path, "--chat_template", qwen3,
                                      "--show_masking", "2"), monkeypatch, capsys)
    assert code == 0, log[-3000:]
    assert '"name": "get_weather", "description": "The weather in a city"' in log  # the tools column, system turn
    for city, temp in (("Oslo", 3), ("Lima", 19)):
        assert (f'[[<think>\nI should look up {city}.\n</think>\n\n<tool_call>\n{{"name": "get_weather", "arguments": '
                f'{{"city": "{city}"}}}}\n</tool_call><|im_end|>]]') in log
        assert f"<tool_response>\n{{\"temp\": {temp}}}\n</tool_response><|im_end|>" in log  # not trained
        assert f"[[<think>\nNow report it.\n</think>\n\nIt is {temp} degrees in {city}.<|im_end|>]]" in log


def test_v1_yaml_dataset_files_are_read_from_dataset_dir(smollm2, tmp_path, monkeypatch, capsys):
    data = make_v1_dir(tmp_path / "lf")
    # chatml: the tool records carry reasoning, which SmolLM2's own template drops (refused: finetune_coverage)
    argv = ["--model_name_or_path", smollm2, "--dataset_dir", data, "--dataset", "mine.yaml", "--output_dir",
            tmp_path / "out", "--dataset_cache_dir", tmp_path / "cache", "--dry_run", "True", "--chat_template",
            "chatml"]
    code, log = run_main(argv, monkeypatch, capsys)
    assert code == 0, log[-3000:]
    train = report_of(tmp_path)["train"]
    assert train["samples_per_source"] == {"tools_v1": 2, "chat_v1": 6, "identity": 10}  # size: that many samples
    assert {Path(f).name: s["format"] for f, s in train["files"].items()} == {
        "tools_v1.jsonl": "messages", "chat_v1.jsonl": "messages", "identity.json": "alpaca"}
    argv[argv.index("mine.yaml")] = str(data / "pairs.yaml")  # a path works too; preference data is refused
    assert "--dataset dpo: " + str(data / "pairs.yaml") + " gives converter pair: preference (DPO) data" in \
        user_error(argv, monkeypatch, capsys)
    media = [{"messages": [{"role": "user", "content": [{"type": "image_url", "value": "a.jpg"},
                                                        {"type": "text", "value": "What is it?"},
                                                        {"type": "audio_url", "value": "b.wav"}]},
                           {"role": "assistant", "content": [{"type": "text", "value": "A cat."}]}]}]
    msg = user_error(dry_run_args(smollm2, write_jsonl(tmp_path / "mm.jsonl", media), tmp_path), monkeypatch, capsys)
    assert "mm.jsonl:1: messages[0].content: multimodal content (images, audio)" in msg


# ------------------------------------------------------------------------------------------------
# Point 6: the messages a LLaMA-Factory user meets are short and exact
# ------------------------------------------------------------------------------------------------

LF_INFO = Path(__file__).parent / "data" / "llamafactory"  # LLaMA-Factory's real dataset_info.json (104 entries)


def lf_args(model, tmp_path, name):
    return ["--model_name_or_path", model, "--dataset_dir", LF_INFO, "--dataset", name, "--output_dir",
            tmp_path / "out", "--dataset_cache_dir", tmp_path / "cache", "--dry_run", "True"]


def test_refusals_name_a_handful_of_entries_and_every_media_kind(smollm2, tmp_path, monkeypatch, capsys):
    msg = user_error(lf_args(smollm2, tmp_path, "alpaca_demo"), monkeypatch, capsys)
    listed = msg.split("its SFT entries include: ")[1]
    names, rest = listed.split(", ...")
    assert "(did you mean 'alpaca_" in msg and 1 <= len(names.split(", ")) <= 5 and "in all)" in rest
    assert "alpaca_en_demo" in names and "mllm" not in listed and len(msg) < 400, msg
    msg = user_error(lf_args(smollm2, tmp_path, "mllm_video_audio_demo"), monkeypatch, capsys)
    assert "describes multimodal data (videos, audio), not supervised fine-tuning data" in msg and len(msg) < 400
    assert "describes KTO data" in user_error(lf_args(smollm2, tmp_path, "kto_en_demo"), monkeypatch, capsys)
    mm = [{"messages": [{"role": "user", "content": "<image><video>What is it?"},
                        {"role": "assistant", "content": "A cat."}], "images": ["a.jpg"], "videos": ["b.mp4"]}]
    msg = user_error(dry_run_args(smollm2, write_jsonl(tmp_path / "mm.jsonl", mm), tmp_path), monkeypatch, capsys)
    assert "mm.jsonl:1: images: multimodal record (images, videos)" in msg


def test_media_in_tables_is_refused_not_dropped(smollm2, tmp_path, monkeypatch, capsys):
    """The same refusals for tables: LLaMA-Factory's media columns in Parquet and CSV, row by row, and a column of
    datasets' Image feature (bytes and path), for the whole file. A table of the same text without media trains."""
    import datasets

    chat = [{"role": "user", "content": "<image>What is it?"}, {"role": "assistant", "content": "A cat."}]
    table = datasets.Dataset.from_dict({"messages": [chat, chat], "images": [[], ["a.jpg"]], "videos": [[], ["b.mp4"]]})
    table.to_parquet(tmp_path / "mm.parquet")
    msg = user_error(dry_run_args(smollm2, tmp_path / "mm.parquet", tmp_path), monkeypatch, capsys)
    assert "mm.parquet:row 2: images: multimodal record (images, videos)" in msg and ":row 1:" not in msg, msg
    with open(tmp_path / "mm.csv", "w", newline="") as f:  # list cells as JSON text, as a CSV export holds them
        csv.writer(f).writerows([["messages", "images"], [json.dumps(chat), ""], [json.dumps(chat), '["a.jpg"]']])
    msg = user_error(dry_run_args(smollm2, tmp_path / "mm.csv", tmp_path), monkeypatch, capsys)
    assert "mm.csv:row 2: images: multimodal record (images)" in msg and ":row 1:" not in msg, msg
    image = datasets.Dataset.from_dict({"messages": [chat], "image": [{"bytes": b"\x89PNG", "path": "a.png"}]})
    image.cast_column("image", datasets.Image()).to_parquet(tmp_path / "image.parquet")
    msg = user_error(dry_run_args(smollm2, tmp_path / "image.parquet", tmp_path), monkeypatch, capsys)
    assert "image.parquet: column 'image' holds multimodal data (image: files as bytes and path)" in msg, msg
    table.remove_columns(["images", "videos"]).to_parquet(tmp_path / "text.parquet")
    code, out = run_main(dry_run_args(smollm2, tmp_path / "text.parquet", tmp_path), monkeypatch, capsys)
    assert code == 0 and "[[A cat.<|im_end|>]]" in out, out[-3000:]


def test_a_hub_only_entry_says_it_needs_the_hub(smollm2, tmp_path):
    from conftest import run_finetune

    proc = run_finetune(lf_args(smollm2, tmp_path, "alpaca_en"), check=False,
                        env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 2 and proc.stdout.count("[finetune] error:") == 1, proc.stdout[-3000:]
    assert (f"--dataset alpaca_en: {LF_INFO}/dataset_info.json gives only hf_hub_url 'llamafactory/alpaca_en' (no "
            f"file_name): it needs the Hugging Face Hub or its cache; it is not in the cache ({tmp_path / 'hub'}) and "
            "the network was not tried (offline: HF_HUB_OFFLINE=1). Download it where there is network") in proc.stdout


def test_llamafactory_flag_names_point_at_this_scripts_flags(smollm2, tmp_path, monkeypatch, capsys):
    msg = user_error(dry_run_args(smollm2, DATA / "identity.json", tmp_path, "--cutoff_len", "1024"), monkeypatch,
                     capsys)
    assert "--cutoff_len: did you mean --model_max_length?" in msg
    msg = user_error(dry_run_args(smollm2, DATA / "identity.json", tmp_path, "--lora_target", "all"), monkeypatch,
                     capsys)  # argparse would take it as an abbreviation of --lora_target_modules
    assert "--lora_target: did you mean --lora_target_modules? (LLaMA-Factory's `all` is all-linear)" in msg
    config = tmp_path / "llamafactory_sft.yaml"  # a LLaMA-Factory training config, as its examples/ write them
    config.write_text(f"model_name_or_path: {smollm2}\nstage: sft\nfinetuning_type: lora\nlora_rank: 8\n"
                      "lora_target: all\ntemplate: qwen\ncutoff_len: 1024\ndataset: identity\n")
    msg = user_error([config], monkeypatch, capsys)
    for hint in ("stage: not needed: this script does supervised fine-tuning",
                 "finetuning_type: did you mean use_lora?",
                 "lora_rank: did you mean lora_r?", "lora_target: did you mean lora_target_modules?",
                 "template: did you mean chat_template?", "cutoff_len: did you mean model_max_length?"):
        assert hint in msg, msg
