"""Nothing the data holds is lost on its way to the tokens (issue 24, points 3-6), on real tokenizers
(../shared/tokenizers) and real files: long texts split into blocks that keep every token (--long_text) and the
token accounting of the data report and log; unfilled {{placeholders}} flagged once and filled with
--placeholders; LLaMA-Factory's v1 format (content parts text/reasoning/tool_call, the tools column, its .yaml
dataset files); short exact messages (close entry names only, every media kind, Hub-only entries, LLaMA-Factory's
flag names)."""

import json
from pathlib import Path

import pytest

from conftest import SHARED, write_jsonl
from test_bad_input import dry_run_args, run_main, user_error
from test_base_model import make_base_model
from test_data_sources import build
import finetune as ft

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
    assert len(starts) == len(ends) == len(docs) and starts[0] == 0 and ends[-1] == len(blocks) - 1  # BOS first, EOS last
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
