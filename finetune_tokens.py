"""The vocabulary a chat template needs, for finetune.py, merge_lora.py and chat.py: a base model becomes a chat
model that stops.

- prepare_tokenizer: the template's turn markers (finetune_template.turn_markers) that are not single tokens of
  the vocabulary become special tokens, and the template's turn end becomes the tokenizer's eos.
- fit_embeddings: embeddings and head grow to hold the new tokens (to a multiple of 64 rows); every new row
  starts as the mean of the model's other rows, so a new token starts as an average token, not as noise.
- lora_token_indices / keep_adapter_small: with LoRA, Q-LoRA or DoRA only the new rows of the embeddings and the
  head are trained (peft's trainable_token_indices) and saved with the adapter; prepare_base_for_adapter rebuilds
  the same resized base for it (chat.py, merge_lora.py), so that base + adapter is the trained model exactly.
- write_stop_tokens: config.json's and generation_config.json's eos_token_id list every end token the template
  writes to close an assistant turn, with the model's own: model.generate, vLLM, TGI, llama.cpp stop there.
"""

import functools
import json
import os

import torch

from finetune_template import SENTINEL, end_of_turn_tokens, render_probe, turn_markers

ROWS_MULTIPLE = 64


def _split_markers(tokenizer, markers):
    """The markers that the tokenizer does not give as one token where the template writes them."""
    chat = [{"role": "user", "content": SENTINEL}, {"role": "assistant", "content": SENTINEL}]
    text = (render_probe(tokenizer, chat) or "") + "".join(markers)  # in context, and each once more on its own
    spans = set(map(tuple, tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]))
    split = []
    for marker in markers:
        at = text.find(marker)
        while at >= 0 and (at, at + len(marker)) in spans:
            at = text.find(marker, at + 1)
        if at >= 0:
            split.append(marker)
    return split


def _turn_end_as_eos(tokenizer, ends):
    """The tokenizer's eos becomes the last end token of a text turn, unless it is one already or the template
    would then render conversations differently (it writes eos_token itself): -> the eos it replaced, or None."""
    if not ends or tokenizer.eos_token in ends:
        return None
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]
    before, old = render_probe(tokenizer, probe), tokenizer.eos_token
    tokenizer.eos_token = ends[-1]
    if before is None or render_probe(tokenizer, probe) != before:
        tokenizer.eos_token = old
        return None
    return old or "none"


def prepare_tokenizer(tokenizer, template_label):
    """Make the template's turn markers single tokens and its turn end the eos; -> the one log line that says
    what was chosen and added. What was added is kept on the tokenizer (tokenizer.finetune_vocabulary) for
    load_model (new rows) and the data report."""
    markers = turn_markers(tokenizer)
    added = _split_markers(tokenizer, markers)
    n_before = len(tokenizer)
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    new_ids = [i for i in tokenizer.convert_tokens_to_ids(added) if i >= n_before]
    ends = end_of_turn_tokens(tokenizer)
    replaced = _turn_end_as_eos(tokenizer, ends)
    tokenizer.finetune_vocabulary = {"chat_template": template_label, "turn_markers": markers,
                                     "added_tokens": added, "new_token_ids": new_ids, "turn_end_tokens": ends}
    line = f"chat template: {template_label}"
    if added:
        line += (f"; added special tokens {' '.join(added)} (the template's turn markers were not single tokens; "
                 f"their embedding rows start as the mean of the others and are trained)")
    if ends:
        line += f"; turn end {' '.join(ends)}" + (f", now the eos (was {replaced})" if replaced else "")
    else:
        line += "; the template closes a turn with no special token: generation stops at the eos only"
    return line


def new_token_ids(tokenizer):
    """Ids of the tokens prepare_tokenizer added to the vocabulary (their embedding rows are new)."""
    return list(getattr(tokenizer, "finetune_vocabulary", {}).get("new_token_ids", ()))


def _gathered(params):
    """All of `params` on every rank under DeepSpeed ZeRO-3 (rank 0's changes kept), else nothing to do."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    import contextlib

    return contextlib.nullcontext()


def fit_embeddings(model, n_tokens, new_ids):
    """Embeddings and head hold n_tokens: grown to the next multiple of 64 rows when they are fewer; the rows of
    new_ids and every added row are set to the mean of the other rows (the head's to the mean of the head's).
    Deterministic, so chat.py and merge_lora.py rebuild the base an adapter was trained on. -> (rows before, after)."""
    rows = model.get_input_embeddings().num_embeddings
    if n_tokens > rows:
        model.resize_token_embeddings(n_tokens, pad_to_multiple_of=ROWS_MULTIPLE, mean_resizing=False)
    after = model.get_input_embeddings().num_embeddings
    fresh = sorted(set(new_ids) | set(range(rows, after)))
    if fresh:
        weights = [model.get_input_embeddings().weight]
        head = model.get_output_embeddings()
        if head is not None and head.weight is not weights[0]:
            weights.append(head.weight)
        with _gathered(weights), torch.no_grad():
            for w in weights:
                keep = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
                keep[fresh] = False
                keep[rows:] = False
                w[fresh] = w[keep].float().mean(0).to(w.dtype)
    return rows, after


def lora_token_indices(model, new_ids):
    """LoraConfig(trainable_token_indices=...) training the new rows of the embeddings and of an untied head
    (a tied head follows its embeddings in peft), or None without new tokens."""
    if not new_ids:
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled() and not torch.cuda.is_available():  # peft gathers the rows on a CUDA device
        raise ValueError("LoRA with new tokens under ZeRO-3 needs GPUs (peft's trainable tokens); on CPU use "
                         "ds_config_zero2.json or no DeepSpeed, or a --chat_template whose markers are tokens.")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is emb.weight:
        return list(new_ids)
    names = {m: n for n, m in model.named_modules()}
    return {names[emb]: list(new_ids), names[head]: list(new_ids)}


def keep_adapter_small(peft_model, new_ids):
    """With new tokens, save only the adapter and its trained token rows: peft would otherwise save the whole
    resized embeddings and head with every adapter (it notices the vocabulary changed) and warn about it. Trainer
    saves through model.save_pretrained (a library internal: finetune_distributed.LIBRARY_INTERNALS)."""
    if new_ids:
        peft_model.save_pretrained = functools.partial(peft_model.save_pretrained, save_embedding_layers=False)


def stop_token_ids(tokenizer, *own, template_kwargs=None):
    """The ids where generation stops: the template's turn-end tokens and the tokenizer's eos, then the model's own
    eos ids (`own`: ints, lists or None), each once."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in end_of_turn_tokens(tokenizer, template_kwargs)]
    ids.append(tokenizer.eos_token_id)
    for o in own:
        ids += o if isinstance(o, (list, tuple)) else [o]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def write_stop_tokens(model, tokenizer):
    """config.eos_token_id and generation_config.eos_token_id: every stop id (a list when several); their
    pad_token_id: the tokenizer's (what Trainer would otherwise align, with a warning; generate pads with it)."""
    gen = getattr(model, "generation_config", None)
    ids = stop_token_ids(tokenizer, model.config.eos_token_id, gen.eos_token_id if gen is not None else None)
    value = ids[0] if len(ids) == 1 else ids
    for config in (model.config, gen) if gen is not None else (model.config,):
        config.eos_token_id = value
        if tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id
    return ids


def fit_model_to_tokenizer(model, tokenizer):
    """load_model's hook: embeddings and head fitted to the tokenizer prepare_tokenizer made, the stop tokens
    written into the configs. -> the ids of the new tokens (their rows are new)."""
    new_ids = new_token_ids(tokenizer)
    fit_embeddings(model, len(tokenizer), new_ids)
    write_stop_tokens(model, tokenizer)
    return new_ids


def save_stop_tokens(model, output_dir):
    """An adapter folder gets the generation config too (what the merged model will have), for its stop tokens;
    a full model's save_pretrained has written it already."""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        model.generation_config.save_pretrained(output_dir)


def adapter_new_token_ids(adapter_dir):
    """The token ids an adapter trained as new rows (adapter_config.json's trainable_token_indices), or []."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        indices = json.load(f).get("trainable_token_indices") or []
    if isinstance(indices, dict):
        indices = sorted({i for ids in indices.values() for i in ids})
    return list(indices)


def prepare_base_for_adapter(model, tokenizer, adapter_dir):
    """The base model as the adapter was trained on it: embeddings and head fitted to the adapter's tokenizer,
    the new rows initialised as in training (the adapter then replaces the trained ones)."""
    new_ids = adapter_new_token_ids(adapter_dir)
    if new_ids or len(tokenizer) > model.get_input_embeddings().num_embeddings:
        fit_embeddings(model, len(tokenizer), new_ids)
    return model
