"""End-to-end training on the tiny model: full, LoRA (every lora_bias), Q-LoRA, DoRA; outputs loaded the way
a user loads them; resume after a real SIGKILL; eval; the launcher; config files."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune
from conftest import ENV, ROOT, read_log_history, run_finetune
from finetune_checkpoints import checkpoint_is_complete

DEMO = ROOT / "examples" / "demo_data.jsonl"
PROBE = [{"role": "user", "content": "What is the capital of Zubrowka?"}]


def common_args(model, data, out, cache, *extra):
    return [str(a) for a in ["--model_name_or_path", model, "--data_path", data, "--output_dir", out,
            "--dataset_cache_dir", cache, "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--save_strategy", "no", "--seed", "7", *extra]]


def probe_inputs(tokenizer):
    enc = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def logits_of(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def losses(history):
    return [h["loss"] for h in history if "loss" in h]


def test_full_finetune_with_eval(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    run_finetune(common_args(tiny_model, DEMO, out, tmp_path / "cache", "--eval_data_path", DEMO,
                             "--max_steps", "30", "--learning_rate", "3e-3", "--eval_strategy", "steps",
                             "--eval_steps", "10"))
    history = read_log_history(out)
    train_losses = losses(history)
    assert train_losses[-1] < 0.7 * train_losses[0], train_losses
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    assert [s for s, _ in evals][:3] == [10, 20, 30] and evals[-1][1] < evals[0][1]
    for name in ("model.safetensors", "config.json", "tokenizer.json", "train_results.json",
                 "trainer_state.json", "data_report.json", "training_loss.png"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.use_cache is True and tokenizer.chat_template  # KV cache off in training only
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert len(changed) == len(base.state_dict())  # every tensor was trained


@pytest.mark.parametrize("lora_bias", ["none", "all", "lora_only"])
def test_lora_adapter_reproduces_trained_model(tiny_model, tmp_path, lora_bias):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    trainer = finetune.train(common_args(
        tiny_model, DEMO, out, tmp_path / "cache", "--use_lora", "True", "--lora_r", "8", "--lora_alpha", "16",
        "--lora_bias", lora_bias, "--max_steps", "12", "--learning_rate", "5e-3",
        "--gradient_checkpointing", "True"))
    train_losses = losses(trainer.state.log_history)
    assert train_losses[-1] < train_losses[0]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # an adapter, not a copy of the base
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = probe_inputs(tokenizer)
    expected = logits_of(trainer.model, inputs)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    torch.testing.assert_close(logits_of(loaded, inputs), expected, rtol=1e-5, atol=1e-5)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_model), inputs)
    assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter changed something


def test_qlora_is_4bit_and_adapter_loads(tiny_model, tmp_path):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path / "out"
    trainer = finetune.train(common_args(
        tiny_model, DEMO, out, tmp_path / "cache", "--q_lora", "True", "--lora_r", "8", "--max_steps", "15",
        "--learning_rate", "5e-3"))
    assert trainer.args.use_lora  # --q_lora alone implies LoRA, never full fine-tuning
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    train_losses = losses(trainer.state.log_history)
    assert train_losses[-1] < train_losses[0]
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = probe_inputs(tokenizer)
    expected = logits_of(trainer.model, inputs)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quant, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits_of(loaded, inputs), expected, rtol=1e-4, atol=1e-4)


def test_dora_adapter(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    trainer = finetune.train(common_args(
        tiny_model, DEMO, out, tmp_path / "cache", "--use_lora", "True", "--use_dora", "True", "--lora_r", "8",
        "--lora_target_modules", "all-linear", "--max_steps", "6", "--learning_rate", "5e-3"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 8
    inputs = probe_inputs(AutoTokenizer.from_pretrained(out))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    torch.testing.assert_close(logits_of(loaded, inputs), logits_of(trainer.model, inputs), rtol=1e-5, atol=1e-5)


def test_lora_starts_from_existing_adapter(tiny_model, tmp_path):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    finetune.train(common_args(tiny_model, DEMO, first, tmp_path / "cache", "--use_lora", "True", "--lora_r", "8",
                               "--max_steps", "4", "--learning_rate", "5e-3"))
    second = tmp_path / "second"
    trainer = finetune.train(common_args(
        tiny_model, DEMO, second, tmp_path / "cache", "--use_lora", "True", "--lora_weight_path", first,
        "--max_steps", "1", "--learning_rate", "0"))
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: unchanged, so it was loaded
    assert any(p.requires_grad for p in trainer.model.parameters())


def _resume_command(model, out, cache):
    return [sys.executable, str(ROOT / "finetune.py"), *common_args(
        model, DEMO, out, cache, "--use_lora", "True", "--lora_r", "8", "--max_steps", "150",
        "--learning_rate", "2e-3", "--save_strategy", "steps", "--save_steps", "10", "--save_total_limit", "1",
        "--logging_steps", "10")]


def test_lora_resume_after_sigkill(tiny_model, tmp_path):
    """Kill -9 a LoRA run right after checkpoint-10 is complete; the same command resumes from it and ends
    where an uninterrupted run ends (step count, optimizer and scheduler state restored)."""
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    reference = tmp_path / "reference"
    subprocess.run(_resume_command(tiny_model, reference, cache), env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)

    out = tmp_path / "out"
    proc = subprocess.Popen(_resume_command(tiny_model, out, cache), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not checkpoint_is_complete(out / "checkpoint-10"):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    killed_at = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")
                    if checkpoint_is_complete(p))
    assert not (out / "adapter_model.safetensors").exists(), "the run finished before it was killed"

    again = run_finetune(_resume_command(tiny_model, out, cache)[2:])
    assert f"resuming from {out}/checkpoint-{killed_at}" in again.stdout
    final = json.loads((out / "trainer_state.json").read_text())
    assert final["global_step"] == 150 and state["global_step"] == 10
    a = load_file(reference / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_incomplete_checkpoint_is_not_resumed(tiny_model, tmp_path):
    out = tmp_path / "out"

    def run(steps):
        return finetune.train(common_args(tiny_model, DEMO, out, tmp_path / "cache", "--use_lora", "True",
                                          "--lora_r", "8", "--max_steps", steps, "--save_strategy", "steps",
                                          "--save_steps", "2"))

    run(4)
    # Simulate a crash while checkpoint-6 was being written: weights there, trainer_state.json not yet.
    broken = out / "checkpoint-6"
    shutil.copytree(out / "checkpoint-4", broken)
    (broken / "trainer_state.json").unlink()
    assert finetune.find_resume_checkpoint(finetune.parse_args(common_args(
        tiny_model, DEMO, out, tmp_path / "cache"))[2]) == str(out / "checkpoint-4")
    trainer = run(6)
    assert trainer.state.global_step == 6
    assert checkpoint_is_complete(out / "checkpoint-6")  # rewritten by the resumed run


def test_tokenizer_without_pad_token_or_template(tiny_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["pad_token"] = None  # (a missing key would get Qwen2Tokenizer's default pad token)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    trainer = finetune.train(common_args(model, DEMO, tmp_path / "out", tmp_path / "cache", "--max_steps", "2"))
    assert trainer.processing_class.pad_token is not None
    assert "ChatML" in capsys.readouterr().out


def test_config_file_and_flag_override(tiny_model, tmp_path):
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model), "data_path": str(DEMO), "output_dir": str(tmp_path / "out"),
        "dataset_cache_dir": str(tmp_path / "cache"), "dry_run": True, "model_max_length": 4096,
        "per_device_train_batch_size": 2}))
    run_finetune([config, "--per_device_train_batch_size", "3"])
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["global_batch_size"] == 3  # the flag overrides the file


def test_help_lists_every_flag_with_help():
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--help"], env=ENV, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0
    import dataclasses

    for cls in (finetune.ModelArguments, finetune.DataArguments, finetune.LoraArguments):
        for f in (f for f in dataclasses.fields(cls) if f.init):  # init=False: internal state, not a flag
            assert f"--{f.name}" in proc.stdout and f.metadata.get("help"), f.name


def test_bad_flags_fail_before_loading(tiny_model, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["--data_path", tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        (["--data_path", DEMO, "--q_lora", "True", "--deepspeed", ROOT / "ds_config_zero3.json"],
         "ds_config_zero2.json"),
        (["--data_path", DEMO, "--no_such_flag", "1"], "no_such_flag"),
    ]
    for args, message in cases:
        proc = run_finetune(["--model_name_or_path", tiny_model, "--output_dir", out, *args], check=False)
        assert proc.returncode != 0 and message in proc.stdout, proc.stdout[-2000:]
        assert "Traceback" not in proc.stdout
        assert not out.exists()


def test_finetune_sh_single_cpu_process(tiny_model, tmp_path):
    help_text = subprocess.run(["bash", str(ROOT / "finetune.sh"), "-h"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--deepspeed" in help_text.stdout and "NNODES" in help_text.stdout
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "finetune.sh"), "-m", tiny_model, "-d", str(DEMO), "-o", str(out), "--use_lora",
         "--max_steps", "3", "--save_strategy", "no", "--dataset_cache_dir", str(tmp_path / "cache"),
         "--lora_r", "8", "--gradient_accumulation_steps", "1"],
        env={**ENV, "MASTER_PORT": "29611", "PYTHON": sys.executable}, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "--nproc_per_node 1" in proc.stdout and "--ddp_backend gloo" in proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
    assert read_log_history(out)[-1]["step"] == 3
