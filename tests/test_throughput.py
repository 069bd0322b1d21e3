"""Throughput features: exact padding-free packing, step-wide loss normalisation, fast cached preprocessing.

Exactness is checked on real tiny models (sdpa and eager attention) and real Trainer steps: no mocks.
Speed is measured by bench/bench.py, never asserted here."""

import json
import os

import numpy as np
import pytest
import torch

import finetune as ft
import finetune_template as ftt
from conftest import SHARED, write_jsonl

LENGTHS = (3, 9, 20, 2)  # words per answer: samples of different lengths and trained-token counts


def conversation(k):
    return [{"role": "system", "content": "You are a helpful assistant."} if k % 2 else
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": "What is the capital of France? " * (k % 3 + 1)},
            {"role": "assistant", "content": " ".join(["The answer is 42."] * k)}]


@pytest.fixture(scope="module")
def tok():
    from make_tiny_model import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def features(tok):
    out = []
    for i, k in enumerate(LENGTHS):
        f = ft.tokenize_conversation(tok, conversation(k), 512)
        out.append({**f, "source_idx": i % 2, "length": len(f["input_ids"])})
    return out


def make_model(tok, attn="sdpa"):
    from make_tiny_model import build_model

    model = build_model(tok, hidden_size=64, num_layers=2, seed=0)
    model.set_attn_implementation(attn)
    return model


def make_trainer(model, tmp_path, dataset=None, collator=None, **args):
    defaults = dict(output_dir=str(tmp_path / "out"), report_to="none", per_device_train_batch_size=1,
                    gradient_accumulation_steps=1, max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0,
                    lr_scheduler_type="constant", save_strategy="no", logging_steps=1, seed=0,
                    train_sampling_strategy="group_by_length", dataloader_num_workers=0)
    training_args = ft.TrainingArguments(**{**defaults, **args})
    return ft.FinetuneTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                              source_names=["a", "b"])


def loss_and_grads(trainer, batches):
    """One optimizer step's loss and gradients through FinetuneTrainer's own step-wide weighting."""
    model = trainer.model
    model.zero_grad()
    samples, total = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    loss = 0.0
    for batch in samples:
        step_loss = trainer.compute_loss(model, batch, num_items_in_batch=total)
        step_loss.backward()
        loss += step_loss.item()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a, b):
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------


def test_packing_collator_layout(features):
    batch = ft.PackingCollator()(features)
    assert "attention_mask" not in batch
    lengths = [len(f["input_ids"]) for f in features]
    starts = np.cumsum([0] + lengths[:-1])
    assert batch["input_ids"].shape == (1, sum(lengths))
    assert batch["input_ids"][0].tolist() == sum((f["input_ids"] for f in features), [])
    expected_pos = sum((list(range(n)) for n in lengths), [])
    assert batch["position_ids"][0].tolist() == expected_pos
    # the first label of every sample is masked: no token is ever trained to predict across a boundary
    assert all(batch["labels"][0, s].item() == ft.IGNORE_INDEX for s in starts)
    # everything else is the sample's own labels
    for f, s in zip(features, starts):
        assert batch["labels"][0, s + 1:s + len(f["labels"])].tolist() == f["labels"][1:]
    trained = [sum(1 for x in f["labels"][1:] if x != ft.IGNORE_INDEX) for f in features]
    assert batch["token_sample_trained"][0].tolist() == sum(([t] * n for t, n in zip(trained, lengths)), [])
    assert batch["token_source"][0].tolist() == sum(([f["source_idx"]] * n for f, n in zip(features, lengths)), [])


def test_padding_collator_pads_to_longest_only(features, tok):
    batch = ft.PaddingCollator(tok.pad_token_id)(features)
    longest = max(len(f["input_ids"]) for f in features)
    assert batch["input_ids"].shape == (len(features), longest)  # never model_max_length
    assert batch["attention_mask"].sum().item() == sum(len(f["input_ids"]) for f in features)
    assert (batch["labels"][batch["attention_mask"] == 0] == ft.IGNORE_INDEX).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(tok, features, tmp_path, attn):
    model = make_model(tok, attn)
    trainer = make_trainer(model, tmp_path)
    padded = loss_and_grads(trainer, [ft.PaddingCollator(tok.pad_token_id)(features)])
    packed = loss_and_grads(trainer, [ft.PackingCollator()(features)])
    alone = [loss_and_grads(trainer, [ft.PaddingCollator(tok.pad_token_id)([f])]) for f in features]
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert_same_grads(packed[1], padded[1])
    # and both equal the token-weighted mean of each sample run on its own (no cross-sample attention)
    n = [sum(1 for x in f["labels"][1:] if x != ft.IGNORE_INDEX) for f in features]
    assert packed[0] == pytest.approx(sum(loss * k for (loss, _), k in zip(alone, n)) / sum(n), rel=1e-5)
    for name in packed[1]:
        expected = sum(g[name] * k for (_, g), k in zip(alone, n)) / sum(n)
        torch.testing.assert_close(packed[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_packing_without_position_restart_would_differ(tok, features, tmp_path):
    """Guard for the test above: the check is sensitive to cross-sample attention."""
    model = make_model(tok)
    trainer = make_trainer(model, tmp_path)
    packed = ft.PackingCollator()(features)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    assert loss_and_grads(trainer, [leaky])[0] != pytest.approx(loss_and_grads(trainer, [packed])[0], rel=1e-5)


def test_use_packing():
    args = ft.DataArguments(data_path="x")
    assert ft.use_packing(args, "flash_attention_2") is True
    assert ft.use_packing(args, "sdpa") is False
    args.packing = "true"
    assert ft.use_packing(args, "sdpa") is True
    args.packing = "false"
    assert ft.use_packing(args, "flash_attention_2") is False


# ---------------------------------------------------------------------------------------------
# Loss normalisation: mean over the trained tokens of the whole optimizer step
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_one_big_batch_direct(tok, features, tmp_path):
    trainer = make_trainer(make_model(tok), tmp_path)
    pad = ft.PaddingCollator(tok.pad_token_id)
    big = loss_and_grads(trainer, [pad(features)])
    accumulated = loss_and_grads(trainer, [pad([f]) for f in features])
    two_packs = loss_and_grads(trainer, [ft.PackingCollator()(features[:1]), ft.PackingCollator()(features[1:])])
    assert accumulated[0] == pytest.approx(big[0], rel=1e-5)
    assert two_packs[0] == pytest.approx(big[0], rel=1e-5)
    assert_same_grads(accumulated[1], big[1])
    assert_same_grads(two_packs[1], big[1])


def _weights_after_one_step(tok, features, tmp_path, name, collator, batch_size, accumulation):
    import datasets

    model = make_model(tok)
    trainer = make_trainer(model, tmp_path / name, datasets.Dataset.from_list(features[:2]), collator,
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation)
    trainer.train()
    assert trainer.state.global_step == 1
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer.state.log_history[0]["loss"]


def test_trainer_step_same_weights_for_accumulation_and_packing(tok, features, tmp_path):
    """Real Trainer steps (SGD, so weights move linearly with the gradient): GA=2 x batch 1, GA=1 x batch 2
    padded, and GA=1 x batch 2 packed end with the same weights and log the same loss."""
    n_trained = [sum(1 for x in f["labels"][1:] if x != ft.IGNORE_INDEX) for f in features[:2]]
    assert n_trained[0] != n_trained[1]  # otherwise a mean of per-micro-batch means would pass too
    pad = ft.PaddingCollator(tok.pad_token_id)
    ga, ga_loss = _weights_after_one_step(tok, features, tmp_path, "ga", pad, 1, 2)
    big, big_loss = _weights_after_one_step(tok, features, tmp_path, "big", pad, 2, 1)
    packed, packed_loss = _weights_after_one_step(tok, features, tmp_path, "packed", ft.PackingCollator(), 2, 1)
    initial = dict(make_model(tok).named_parameters())
    assert any(not torch.equal(big[n], initial[n]) for n in big)  # the step did change the weights
    assert ga_loss == pytest.approx(big_loss, rel=1e-4) and packed_loss == pytest.approx(big_loss, rel=1e-4)
    for name in big:
        torch.testing.assert_close(ga[name], big[name], rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(packed[name], big[name], rtol=1e-4, atol=1e-6, msg=name)


def test_length_grouped_sampler_reads_lengths_at_once(tok, features, tmp_path):
    import datasets

    data = datasets.Dataset.from_list(features * 8)
    trainer = make_trainer(make_model(tok), tmp_path, data, ft.PaddingCollator(tok.pad_token_id),
                           per_device_train_batch_size=4)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler.lengths, list) and sampler.lengths == data["length"][:]
    order = list(sampler)
    assert sorted(order) == list(range(len(data)))


# ---------------------------------------------------------------------------------------------
# Preprocessing: exact, batched, cached
# ---------------------------------------------------------------------------------------------


def _records(n):
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over the lazy dog answer is 42 hello paris".split()
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": " ".join(rng.choice(words, rng.integers(1, 30)))},
                {"role": "assistant", "content": " ".join(rng.choice(words, rng.integers(1, 60)))}]
        if i % 3 == 0:
            msgs += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok " * (i % 7 + 1)}]
        out.append({"messages": msgs})
    return out


def _args(path, tmp_path, **data):
    data_args = ft.DataArguments(data_path=path, **data)
    training_args = ft.TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", model_max_length=256)
    return data_args, training_args


def test_preprocessing_exact_and_cached(tok, tmp_path, monkeypatch):
    import datasets

    records = _records(300)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    data_args, training_args = _args(path, tmp_path)
    calls = []
    real = ft._tokenize_batch
    monkeypatch.setattr(ft, "_tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = ft.build_dataset(path, tok, data_args, training_args, str(tmp_path / "cache"))
    assert calls, "the first run tokenizes"
    data = datasets.load_from_disk(os.path.join(first, "data"))
    assert len(data) == len(records)
    for row, rec in zip(data, records):  # input_ids exactly as the model's template tokenizes them
        assert row["input_ids"] == tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=False)
        ref = ft.tokenize_conversation(tok, rec["messages"], 256)
        assert row["labels"] == ref["labels"]
        # independently of the masking code: ChatML trains exactly each reply and its <|im_end|>
        trained = [t for t in row["labels"] if t != ft.IGNORE_INDEX]
        replies = "".join(m["content"] + "<|im_end|>" for m in rec["messages"] if m["role"] == "assistant")
        assert tok.decode(trained) == replies
        assert row["length"] == len(ref["input_ids"])
        assert row["n_trained"] == sum(1 for x in ref["labels"][1:] if x != ft.IGNORE_INDEX)

    calls.clear()
    second = ft.build_dataset(path, tok, data_args, training_args, str(tmp_path / "cache"))
    assert second == first and not calls, "the second run with the same data/tokenizer/settings is a cache hit"

    training_args.model_max_length = 128  # another setting: another cache entry, tokenized again
    third = ft.build_dataset(path, tok, data_args, training_args, str(tmp_path / "cache"))
    assert third != first and calls
    assert max(datasets.load_from_disk(os.path.join(third, "data"))["length"][:]) <= 128


def test_preprocessing_workers_give_the_same_data(tok, tmp_path):
    import datasets

    records = _records(120)
    path = write_jsonl(tmp_path / "d.jsonl", records)
    out = []
    for workers in (None, 2):
        data_args, training_args = _args(path, tmp_path, preprocessing_num_workers=workers)
        built = ft.build_dataset(path, tok, data_args, training_args, str(tmp_path / f"cache{workers}"))
        out.append(datasets.load_from_disk(os.path.join(built, "data")).to_dict())
    assert out[0] == out[1]
    assert json.dumps(out[0]["input_ids"][:3])  # plain ints, JSON-serialisable


def overlapping_tokens(offsets, a, b):
    """Reference: the (first, last + 1) token indices whose characters overlap [a, b); (k, k) when none do."""
    hit = [t for t, (s, e) in enumerate(offsets) if s < b and e > a and b > a]
    return (hit[0], hit[-1] + 1) if hit else None


@pytest.mark.parametrize("name", ["tiny", "gpt-2", "llama-spm"])
def test_region_boundary_lookup_matches_token_offsets(tokenizer, name):
    """_encode finds each region's tokens from its two boundaries (char_to_token) instead of every token's
    offsets; at every character position, mid-token and inside byte-split characters included, it must
    give the tokens that overlap the region, as a brute-force look at every token's offsets does; and the
    offsets-only path (_token_spans) must give the same."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = tokenizer if name == "tiny" else AutoTokenizer.from_pretrained(SHARED / "tokenizers" / name)
    texts = ["<|im_start|>assistant\n魑魅魍魉 ok 😀x<|im_end|>\n", "helloworld  tokens\tand   spaces",
             "<|im_start|>user\nÀ la carte: 1234567890<|im_end|><|im_start|>assistant\nantidisestablishment",
             "[/INST] 😀 two</s>\r\n\r\nB"]
    for text in texts:
        regions = [(a, b) for a in range(len(text) + 1) for b in (a, min(len(text), a + 1), min(len(text), a + 3),
                                                                   len(text))]
        (ids, spans), = ftt.encode_regions(tok, [text], [regions])
        offsets = tok.backend_tokenizer.encode(text, add_special_tokens=False).offsets
        assert spans == ftt._token_spans(np.asarray(offsets).reshape(-1, 2), regions), text
        for (a, b), span in zip(regions, spans):
            expected = overlapping_tokens(offsets, a, b)
            assert (span if expected else span[1] - span[0]) == (expected or 0), (text, a, b)
        assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
