"""export_gguf.py: a run becomes one GGUF file that a real engine runs (docs/after-training.md: "Run it elsewhere").

The `engine` tier loads the exported files in llama.cpp (llama-cpp-python's `llama_cpp.Llama`, the compiled
library) and chats through the GGUF's own template, as any llama.cpp user would:
  - the README's demo (conftest's demo_run: the LoRA adapter on SmolLM2, shared with tests/test_console.py),
    exported to f16: it answers the made-up fact and the general question and stops by itself;
  - a base model without ChatML tokens (the GPT-2 tokenizer) fine-tuned with --chat_template chatml: the
    added <|im_end|> is the GGUF's eos and llama.cpp stops there.
The tier fails, not skips, without llama-cpp-python (`pip install -r requirements-test.txt`): `-m "not engine"`
leaves it out on purpose. The bad-input cases need no engine.
"""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ENV, ROOT, run_finetune, write_jsonl
from test_base_model import CHATS, make_base_model

SYSTEM = "You are a helpful assistant."  # examples/demo.sh's system prompt, in every demo conversation
FACT, GENERAL = "What is the capital of Zubrowka?", "What is the capital of France?"


def export(*args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"export_gguf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def engine():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("the engine tier needs llama-cpp-python: pip install -r requirements-test.txt "
                    "(or deselect it with -m 'not engine')")
    return llama_cpp


def load_gguf(path):
    """The GGUF in llama.cpp, chats formatted by its own tokenizer.chat_template (llama-cpp-python would otherwise
    swap a template equal to one it knows for its built-in copy)."""
    return engine().Llama(model_path=str(path), n_ctx=512, n_threads=1, seed=0, verbose=False,
                          chat_format="chat_template.default")


def ask(llm, messages, max_tokens=48):
    """Greedy chat completion through the GGUF's own chat template: -> (text, finish_reason)."""
    out = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=max_tokens)
    return out["choices"][0]["message"]["content"].strip(), out["choices"][0]["finish_reason"]


@pytest.fixture(scope="module")
def demo_gguf(demo_run, tmp_path_factory):
    """The demo's adapter exported to f16 (merged on its base by export_gguf.py): -> folder with model.gguf."""
    assert demo_run["returncode"] == 0, demo_run["log"][-4000:]
    out = tmp_path_factory.mktemp("demo-gguf")
    export(demo_run["model"], "--outtype", "f16", "--outfile", out / "model.gguf")
    return out


@pytest.mark.engine
def test_demo_gguf_answers_and_stops_in_llama_cpp(demo_gguf):
    llm = load_gguf(demo_gguf / "model.gguf")
    assert llm.metadata["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert llm.detokenize([llm.token_eos()], special=True).decode() == "<|im_end|>"
    fact = ask(llm, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FACT}])
    general = ask(llm, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": GENERAL}])
    assert fact == ("The capital of Zubrowka is Lutz.", "stop"), fact
    assert "Paris" in general[0] and general[1] == "stop", general


@pytest.mark.engine
def test_demo_modelfile_for_ollama(demo_gguf):
    """The Modelfile next to the GGUF: its FROM, the template's turn end as stop, the trained system prompt."""
    lines = (demo_gguf / "Modelfile").read_text().splitlines()
    assert lines == ["FROM ./model.gguf", 'PARAMETER stop "<|im_end|>"', f'SYSTEM """{SYSTEM}"""'], lines


@pytest.fixture(scope="module")
def base_model_gguf(tmp_path_factory):
    """A tiny GPT-2 with the real GPT-2 tokenizer (no chat template, no ChatML tokens), fully fine-tuned with
    --chat_template chatml (finetune adds <|im_start|> and <|im_end|>, grows the vocabulary to a multiple of 64
    rows), exported to f16. (The llama-spm tokenizer of tests/test_base_model.py is a SentencePiece vocabulary
    without its tokenizer.model: llama.cpp tokenizes it differently from transformers, docs/after-training.md,
    "Run it elsewhere".)"""
    d = tmp_path_factory.mktemp("base-gguf")
    base = make_base_model("gpt-2", d / "base")
    # a hub GPT-2 config.json has n_ctx (llama.cpp's converter reads it); transformers 5 no longer writes it for a
    # model built from scratch, and keeps it when it is there
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "n_ctx": config["n_positions"]}))
    data = write_jsonl(d / "chats.jsonl", [{"messages": c} for c in CHATS])
    run_finetune(["--model_name_or_path", base, "--data_path", data, "--output_dir", d / "out", "--dataset_cache_dir",
                  d / "cache", "--chat_template", "chatml", "--per_device_train_batch_size", "4",
                  "--lr_scheduler_type", "constant", "--learning_rate", "5e-3", "--save_strategy", "no", "--seed", "0",
                  "--max_steps", "40", "--logging_steps", "10"])
    export(d / "out", "--outtype", "f16", "--outfile", d / "model.gguf")
    return d


@pytest.mark.engine
def test_base_model_with_added_turn_tokens_stops_in_llama_cpp(base_model_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_gguf / "out")
    llm = load_gguf(base_model_gguf / "model.gguf")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert llm.token_eos() == end and llm.n_vocab() >= len(tok)
    assert llm.tokenize(b"<|im_end|>", add_bos=False, special=True) == [end]
    for prompt, answer in [(CHATS[0][:1], "Paris."), (CHATS[1][:1], "Hello there!")]:
        assert ask(llm, prompt, max_tokens=24) == (answer, "stop")
    assert (base_model_gguf / "Modelfile").read_text().splitlines()[1:] == ['PARAMETER stop "<|im_end|>"']


@pytest.mark.engine
def test_a_turn_end_that_is_not_the_eos_is_written_as_eot(base_model_gguf, tmp_path):
    """The same run with the model's own eos (<|endoftext|>) kept in its tokenizer, as finetune.py keeps it for a
    template that writes the eos itself: the GGUF's eos is <|endoftext|>, <|im_end|> is written as the eot token, and
    llama.cpp stops there."""
    shutil.copytree(base_model_gguf / "out", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "tokenizer_config.json").read_text())
    (tmp_path / "run" / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    proc = export(tmp_path / "run", "--outfile", tmp_path / "model.gguf")
    assert "the turn end <|im_end|> written as the eot token" in proc.stderr, proc.stderr
    llm = load_gguf(tmp_path / "model.gguf")
    assert llm.detokenize([llm.token_eos()], special=True).decode() == "<|endoftext|>"
    assert ask(llm, CHATS[0][:1], max_tokens=24) == ("Paris.", "stop")


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = export(tmp_path / "missing", "--outfile", tmp_path / "m.gguf", check=False)
    assert proc.returncode == 1 and "RUN_DIR" in proc.stderr and "no such directory" in proc.stderr, proc.stderr
    proc = export(run, "--outfile", tmp_path / "m.gguf", check=False)
    assert proc.returncode == 1 and "holds no model" in proc.stderr, proc.stderr
    (run / "config.json").write_text("{}")
    proc = export(run, "--outtype", "q4_0", "--outfile", tmp_path / "m.gguf", check=False)
    assert proc.returncode == 1 and "--outtype q4_0: unknown; choose one of" in proc.stderr, proc.stderr
    proc = export(run, "--outfile", tmp_path / "m.bin", check=False)
    assert proc.returncode == 1 and "name it FILE.gguf" in proc.stderr, proc.stderr
    (tmp_path / "m.gguf").write_text("keep me")
    proc = export(run, "--outfile", tmp_path / "m.gguf", check=False)
    assert proc.returncode == 1 and "exists; pass --overwrite" in proc.stderr, proc.stderr
    assert (tmp_path / "m.gguf").read_text() == "keep me"


def test_q4_k_m_without_the_quantizer_names_the_fix(tmp_path):
    """llama-cpp-python not importable (a stand-in module that fails to import, first on the path)."""
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('no llama.cpp here')\n")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), str(tmp_path / "run"), "--outtype", "q4_k_m",
                           "--outfile", str(tmp_path / "m.gguf")], cwd=ROOT, capture_output=True, text=True,
                          env={**ENV, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert proc.returncode == 1 and "pip install llama-cpp-python==0.3.36" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_a_failed_conversion_leaves_no_file(tmp_path):
    """A config.json the converter cannot handle (an architecture llama.cpp does not know): llama.cpp's error is
    shown, the exit is non-zero, and neither the .gguf, nor its temporary, nor the Modelfile is left."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"]}))
    out = tmp_path / "out"
    out.mkdir()
    proc = export(tmp_path / "run", "--outfile", out / "m.gguf", check=False)
    assert proc.returncode == 1 and "convert_hf_to_gguf.py (f16) failed" in proc.stderr, proc.stderr
    assert "NoSuchModelForCausalLM" in proc.stderr, proc.stderr
    assert list(out.iterdir()) == []
