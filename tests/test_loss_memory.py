"""The loss never builds the full logits (issue 10): chunked cross-entropy over trained positions only.

Reference: the loss as finetune.py computed it before (full logits, fp32 cross-entropy at every position,
per-token weights from `--loss_balance`), written out below. Every case compares loss, per-source CE sums
and the gradient of every trainable parameter, over the micro-batches of one optimizer step (gradient
accumulation: weights normalised step-wide), on real models built by finetune.load_model and real batches
from finetune's collators. The chunk size is forced small so that every batch takes several chunks.
Stated tolerance: fp32 rounding (matmuls blocked differently, sums in another order): 1e-5 relative.
"""

import json
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import finetune as ft
import finetune_loss
import finetune_report as fr
from conftest import ROOT, read_log_history, run_finetune

DEMO = ROOT / "examples" / "demo_data.jsonl"  # 18 conversations, 2 sources
CHUNK = 7
REL = 1e-5


def reference_token_ce(model, batch):
    """Today's computation before issue 10: the full logits, fp32 CE at every position, [batch, seq]; position t
    is trained on target[t] = labels[t+1] (ft.shifted_labels), the layout of the per-token columns."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "token_source", "token_sample_trained",
                                                          "loss_weights")}
    logits = model(**inputs, use_cache=False).logits
    target = ft.shifted_labels(batch)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=ft.IGNORE_INDEX, reduction="none").view_as(target)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, tiny_model):
    """The tiny model with lm_head tied to the input embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tied")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return str(path)


def build(model_path, tmp_path, method="full", loss_balance="token", chunk=CHUNK, attn="sdpa"):
    model_args = ft.ModelArguments(model_name_or_path=model_path)
    data_args = ft.DataArguments(data_path=str(DEMO), dataset_cache_dir=str(tmp_path / "cache"),
                                 loss_balance=loss_balance)
    training_args = ft.TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                         use_lora=method != "full", loss_chunk_tokens=chunk)
    # LoRA on lm_head too, without dropout (the chunks apply the head to other row groups than the reference)
    lora_args = ft.LoraArguments(lora_r=4, lora_dropout=0.0, q_lora=method == "q-lora",
                                 lora_target_modules="q_proj,v_proj,lm_head")
    ft.validate_args(model_args, data_args, training_args, lora_args)
    tokenizer = ft.load_tokenizer(model_args, training_args)
    train, _, reports = ft.load_datasets(data_args, training_args, tokenizer)
    torch.manual_seed(0)
    model = ft.load_model(model_args, training_args, lora_args, attn)
    with torch.no_grad():  # LoRA B starts at 0: give the adapters (lm_head's included) a real effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    trainer = ft.FinetuneTrainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                                 data_collator=ft.PaddingCollator(tokenizer.pad_token_id),
                                 loss_balance=loss_balance, source_names=reports[0]["sources"])
    return trainer, train, tokenizer


def step_batches(train, tokenizer, packing, sizes=(3, 5, 4)):
    """One optimizer step of 3 micro-batches (gradient accumulation) over both sources."""
    rows = [train[i] for i in range(sum(sizes))]
    collate = ft.PackingCollator() if packing else ft.PaddingCollator(tokenizer.pad_token_id)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [collate(rows[s:s + n]) for s, n in zip(starts, sizes)]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close(a, b, what):
    scale = max(float(b.abs().max()), 1e-12)
    assert float((a - b).abs().max()) <= REL * scale, f"{what}: {float((a - b).abs().max())} vs scale {scale}"


def run_step(trainer, batches):
    """Loss, per-source CE sums and gradients: finetune's compute_loss vs the reference, same weights."""
    model = trainer.model
    model.train()
    weights, total = trainer._token_weights(batches)
    sums = trainer._source_sums["train"]
    ours, ref = [], []
    model.zero_grad()
    sums.zero_()
    for b, w in zip(batches, weights):
        loss = trainer.compute_loss(model, {**b, "loss_weights": w.float()}, num_items_in_batch=total)
        loss.backward()
        ours.append(float(loss))
    our_grads, our_sums = grads(model), sums.clone()
    model.zero_grad()
    ref_sums = torch.zeros_like(sums)
    for b, w in zip(batches, weights):
        ce = reference_token_ce(model, b)
        loss = (ce * w.float()).sum() / total.clamp(min=1e-8)
        loss.backward()
        ref.append(float(loss))
        mask = ft.shifted_labels(b) != ft.IGNORE_INDEX
        src = b["token_source"][mask]
        ref_sums[0] += torch.bincount(src, weights=ce[mask].detach().double(), minlength=sums.shape[1])
        ref_sums[1] += torch.bincount(src, minlength=sums.shape[1]).double()
    assert trainer.token_loss.chunked, "the chunked path must be in use"
    for a, b in zip(ours, ref):
        assert abs(a - b) <= REL * abs(b), (ours, ref)
    assert_close(our_sums, ref_sums, "per-source CE sums")
    ref_grads = grads(model)
    assert our_grads.keys() == ref_grads.keys() and our_grads
    for name in ref_grads:
        assert_close(our_grads[name], ref_grads[name], name)
    return our_grads


@pytest.mark.parametrize("method,balance,packing", [
    ("full", "token", False), ("full", "sample", True), ("full", "source", False),
    ("lora", "token", True), ("lora", "source", False), ("q-lora", "sample", False),
])
def test_chunked_loss_equals_full_logits(tiny_model, tmp_path, method, balance, packing):
    trainer, train, tokenizer = build(tiny_model, tmp_path, method, balance)
    got = run_step(trainer, step_batches(train, tokenizer, packing))
    if method != "full":  # the adapter on lm_head is trained through the chunks
        assert any("lm_head" in n and "lora_A" in n and g.abs().sum() > 0 for n, g in got.items())


def test_tied_embeddings(tied_model, tmp_path):
    trainer, train, tokenizer = build(tied_model, tmp_path, "full", "token")
    got = run_step(trainer, step_batches(train, tokenizer, packing=False))
    assert "model.embed_tokens.weight" in got and "lm_head.weight" not in got  # one tied parameter


def test_batch_without_trained_tokens(tiny_model, tmp_path):
    """A micro-batch with no trained token gives a zero loss that still backpropagates (DDP/ZeRO need it)."""
    trainer, train, tokenizer = build(tiny_model, tmp_path)
    batch = step_batches(train, tokenizer, False, sizes=(2,))[0]
    batch["labels"][:] = ft.IGNORE_INDEX
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert float(loss) == 0 and loss.requires_grad


class VocabTensors(TorchDispatchMode):
    """Records every tensor whose last dimension is the vocabulary: the largest one (in rows) and the peak
    of bytes held at once by such tensors (weak references tell when they are freed)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.live, self.peak, self.max_rows = vocab, 0, 0, 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() not in inputs):  # views (W.t()) are not new memory
                self.max_rows = max(self.max_rows, t.numel() // self.vocab)
                nbytes = t.numel() * t.element_size()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


def test_no_full_logits_forward_or_backward(tiny_model, tmp_path):
    """The test that fails if full logits come back: with a 2-token chunk, no [tokens x vocab] tensor has
    more rows than a chunk, and such tensors never hold more than a few chunks' worth at once."""
    chunk = 2
    trainer, train, tokenizer = build(tiny_model, tmp_path, chunk=chunk)
    batch = step_batches(train, tokenizer, False, sizes=(3,))[0]
    trained = int((batch["labels"][:, 1:] != ft.IGNORE_INDEX).sum())
    vocab = trainer.model.config.vocab_size
    assert trained > 10 * chunk and batch["labels"].numel() > 30 * chunk, (trained, batch["labels"].shape)
    trainer.compute_loss(trainer.model, batch)  # the first batch decides chunked vs fallback
    with VocabTensors(vocab) as seen:
        trainer.compute_loss(trainer.model, batch).backward()
    assert trainer.token_loss.chunked
    assert seen.max_rows <= max(chunk, len(batch["labels"])), seen.max_rows  # model's own output: last position
    one_chunk = chunk * vocab * 4
    assert seen.peak <= 4 * one_chunk, (seen.peak / one_chunk, "chunks of fp32 logits held at once")  # 2.0 seen


def test_softcapped_head_falls_back_with_notice(tmp_path, tokenizer, capsys):
    """A head whose logits the model changes (Gemma-2 softcapping) is noticed; the loss is still exact."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=3.0,
                          pad_token_id=tokenizer.pad_token_id)
    path = tmp_path / "gemma2"
    Gemma2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    trainer, train, tok = build(str(path), tmp_path, chunk=CHUNK, attn="eager")  # Gemma-2: no sdpa
    batch = step_batches(train, tok, False, sizes=(2,))[0]
    loss = trainer.compute_loss(trainer.model, batch)
    assert trainer.token_loss.chunked is False
    assert "computed from the full logits" in capsys.readouterr().out
    ce = reference_token_ce(trainer.model, batch)
    mask = ft.shifted_labels(batch) != ft.IGNORE_INDEX
    assert abs(float(loss) - float(ce[mask].mean())) <= REL * float(ce[mask].mean())


def test_chunk_size_is_automatic_and_bounded(tiny_model):
    from transformers import AutoConfig

    assert fr.loss_chunk_tokens(151_936) == 441  # 256 MiB of fp32 logits
    assert fr.loss_chunk_tokens(151_936, requested=64) == 64
    assert fr.loss_chunk_tokens(10**9) == 1
    # --dry_run's estimate holds one chunk of logits (its bf16 values, fp32 copy and gradient), not the batch's
    config = AutoConfig.from_pretrained(tiny_model)
    config.vocab_size = 151_936
    gib = 1024 ** 3
    for tokens in (16_384, 100_000):
        est = fr.estimate_memory_gb(config, "full", 0, 1, tokens, 2, 64, False)
        assert est["logits"] == round(441 * 151_936 * (2 + 8) / gib, 3)
    assert fr.estimate_memory_gb(config, "full", 0, 1, 100, 2, 64, False)["logits"] == round(
        100 * 151_936 * 10 / gib, 3)
    assert fr.estimate_memory_gb(config, "full", 0, 1, 16_384, 2, 64, False, loss_chunk=64)["logits"] == round(
        64 * 151_936 * 10 / gib, 3)


def forward_pass_reference(model_path, tokenizer, data=DEMO):
    """An independent forward (and backward) pass, one conversation at a time, full logits: the token-mean
    CE over the assistant tokens of every conversation, and the norm of its gradient."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    encoded = [ft.tokenize_conversation(tokenizer, json.loads(line)["messages"], 8192)
               for line in open(data) if line.strip()]
    count = sum(sum(x != ft.IGNORE_INDEX for x in e["labels"][1:]) for e in encoded)
    total = 0.0
    for e in encoded:
        logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(e["labels"][1:])
        m = labels != ft.IGNORE_INDEX
        ce = F.cross_entropy(logits[m].float(), labels[m], reduction="sum")
        (ce / count).backward()
        total += float(ce)
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return total / count, norm


def logged(out):
    return [(h["loss"], h["grad_norm"]) for h in read_log_history(out) if "loss" in h]


def test_learning_rate_0_loss_equals_forward_pass(tiny_model, tokenizer, tmp_path):
    """One step over the whole demo set (18 = 6 x 3 accumulation) with lr 0: the logged loss is the
    token-mean CE of a plain forward pass over the assistant tokens, the gradient norm its gradient's."""
    out = tmp_path / "out"
    run_finetune(["--model_name_or_path", tiny_model, "--data_path", DEMO, "--output_dir", out,
                  "--dataset_cache_dir", tmp_path / "cache", "--learning_rate", 0, "--max_steps", 1,
                  "--per_device_train_batch_size", 6, "--gradient_accumulation_steps", 3, "--logging_steps", 1,
                  "--save_strategy", "no", "--loss_chunk_tokens", 5])
    (loss, norm), = logged(out)
    ref_loss, ref_norm = forward_pass_reference(tiny_model, tokenizer)
    assert abs(loss - ref_loss) <= 1e-4 * ref_loss, (loss, ref_loss)
    assert abs(norm - ref_norm) <= 1e-4 * ref_norm, (norm, ref_norm)


def test_two_processes_zero3_tied_head(tied_model, tokenizer, tmp_path):
    """torchrun, 2 processes, DeepSpeed ZeRO-3 (lm_head = the partitioned input embeddings, gathered by
    the module's hooks in every chunk; ranks with different numbers of chunks), lr 0, one step over the
    whole demo set: loss and gradient norm equal the independent full-logits forward/backward pass."""
    from test_distributed import ZERO3, torchrun

    out = tmp_path / "out"
    torchrun(2, ["--model_name_or_path", tied_model, "--data_path", DEMO, "--output_dir", out,
                 "--dataset_cache_dir", tmp_path / "cache", "--deepspeed", ZERO3, "--ddp_backend", "gloo",
                 "--per_device_train_batch_size", 9, "--learning_rate", 0, "--max_steps", 2, "--logging_steps", 1,
                 "--save_strategy", "no", "--loss_chunk_tokens", 5])
    ref_loss, ref_norm = forward_pass_reference(tied_model, tokenizer)
    for loss, norm in logged(out):  # 2 steps: the same data in another order, the same weights
        assert abs(loss - ref_loss) <= REL * ref_loss, (loss, ref_loss)
        assert abs(norm - ref_norm) <= REL * ref_norm, (norm, ref_norm)


def test_fused_loss_refused_without_gpu_or_package(tiny_model, tmp_path):
    """--fused_loss cce stops before loading anything, naming what is missing (a GPU, or the package)."""
    proc = run_finetune(["--model_name_or_path", tiny_model, "--data_path", DEMO, "--output_dir", tmp_path / "out",
                         "--fused_loss", "cce"], check=False)
    assert proc.returncode == 2 and "--fused_loss cce needs" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout and not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (Cut Cross-Entropy is a Triton kernel)")
def test_fused_cce_equals_chunked_on_gpu():
    """Per-token CE and gradients of Cut Cross-Entropy (filter_eps=None) equal the chunked loss's."""
    pytest.importorskip("cut_cross_entropy", reason="pip install cut-cross-entropy")
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32_000, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, 32_000, (300,), device="cuda")
    weights = torch.rand(300, device="cuda")
    results = []
    for ce_fn in (lambda: finetune_loss.fused_cross_entropy(head, hidden, target),
                  lambda: finetune_loss.chunked_cross_entropy(head, hidden, target, 64)):
        head.zero_grad()
        hidden.grad = None
        ce = ce_fn()
        (ce * weights).sum().backward()
        results.append((ce.detach(), hidden.grad.float(), head.weight.grad.float()))
    for a, b in zip(*results):
        assert float((a - b).abs().max()) <= 1e-2 * float(b.abs().max()), float((a - b).abs().max())


def test_two_processes_zero3_lora_on_head(tiny_model, tokenizer, tmp_path):
    """torchrun, 2 processes, ZeRO-3, LoRA on lm_head (its frozen base weight is released and gathered
    again around every recomputed chunk), lr 0: the loss is the independent forward pass's (LoRA B
    starts at 0, so the adapted model computes what the base model does)."""
    from test_distributed import ZERO3, torchrun

    out = tmp_path / "out"
    torchrun(2, ["--model_name_or_path", tiny_model, "--data_path", DEMO, "--output_dir", out,
                 "--dataset_cache_dir", tmp_path / "cache", "--deepspeed", ZERO3, "--ddp_backend", "gloo",
                 "--per_device_train_batch_size", 9, "--learning_rate", 0, "--max_steps", 1, "--logging_steps", 1,
                 "--save_strategy", "no", "--loss_chunk_tokens", 5, "--use_lora", "True",
                 "--lora_target_modules", "q_proj,v_proj,lm_head", "--lora_dropout", 0])
    ref_loss, _ = forward_pass_reference(tiny_model, tokenizer)
    (loss, norm), = logged(out)
    assert abs(loss - ref_loss) <= REL * ref_loss and norm > 0, (loss, ref_loss, norm)
