"""Distributed plumbing for finetune.py and every workaround for a library's internals, in one place.

- the DeepSpeed config, read by one function (deepspeed_config; zero_stage);
- how a run batches (batch_plan: data-parallel size, global batch, steps per epoch);
- sequence parallelism (DeepSpeed Ulysses through accelerate): the checks, the loader wrappers, the
  gradient divisor;
- library workarounds (the notices dropped from the console are finetune_console.KNOWN_NOTICES);
- LIBRARY_INTERNALS: every private method, attribute or behaviour of transformers, accelerate, DeepSpeed and
  Jinja that finetune relies on, with why and the version it was checked against (described in
  library_internals.json, probed by the probe_* functions here). tests/test_library_internals.py probes each
  entry and fails naming it when a library changes it.
"""

import contextlib
import functools
import json
import math
import os

import torch

from finetune_console import KNOWN_NOTICES  # LIBRARY_INTERNALS probes their loggers
from finetune_exit_codes import record_exit_code


def deepspeed_config(training_args):
    """--deepspeed as a dict ({} without DeepSpeed): the file it names, read here and nowhere else, or the dict
    it already is (a config given in code, or rebuilt for a universal resume)."""
    ds = training_args.deepspeed
    if not ds:
        return {}
    if isinstance(ds, dict):
        return ds
    if not os.path.isfile(ds):
        raise FileNotFoundError(f"--deepspeed {ds} does not exist.")
    try:
        with open(ds) as f:
            return json.load(f)
    except ValueError as e:
        raise ValueError(f"--deepspeed {ds} is not valid JSON: {e}") from None


def zero_stage(training_args):
    return int(deepspeed_config(training_args).get("zero_optimization", {}).get("stage", 0))


def start_cpu_deepspeed_state(training_args):
    """DeepSpeed without GPUs (CPU runs and tests under torchrun): accelerate picks no process-group backend
    then and every rank would believe it is alone (world_size 1). Start its shared state with the
    --ddp_backend (gloo) first; TrainingArguments and Trainer then reuse it. Called from
    TrainingArguments._setup_devices."""
    if training_args.deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend=training_args.ddp_backend or "gloo", timeout=training_args.ddp_timeout_delta)
        finally:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        training_args.accelerator_config.use_configured_state = True



# Sequence parallelism: DeepSpeed Ulysses through the HF Trainer (--sequence_parallel_size N)
# accelerate's ParallelismConfig(sp_backend="deepspeed") makes N consecutive ranks one group: DeepSpeed's
# data loader adapter gathers the group's batches, turns labels into shift_labels (before cutting, so the
# target across a shard boundary is kept) and gives each rank 1/N of every row (all per-token columns);
# the attention all-to-all gives each rank all positions for 1/N of the heads. ZeRO still partitions over
# all ranks; gradients are summed over all ranks and divided by the data-parallel size (world / N).
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def close_process_group():
    """Destroy the process group while the interpreter is still whole, on every exit path. Left to interpreter
    shutdown, gloo's worker threads can still hold finished work whose tensors reference Python objects, and
    freeing them then aborts the process ("terminate called without an active exception", SIGABRT) now and
    then: a run that trained and saved ends with a signal instead of its exit code."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def stop_together(error):
    """Every rank ends with the same outcome of the checks it ran on its own (flags, files, folders): `error`, this
    rank's user error or None, is shared with all ranks (one all_gather) before anyone leaves. TrainingArguments
    forms the process group while the flags are parsed, and a rank that left at once could close its connections
    while a slower peer was still joining: gloo then fails that peer with "Connection closed by peer", a traceback
    and exit 1 instead of the message and exit 2. The lowest rank with an error raises it (its message, once);
    every other rank stops quietly with the same exit code. Without a process group the error is raised as it is."""
    from finetune_exit_codes import ExitCode, StopQuietly

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if error is not None:
            raise error
        return
    seen = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(seen, None if error is None else str(error))
    failed = [rank for rank, message in enumerate(seen) if message is not None]
    if failed and failed[0] == torch.distributed.get_rank():
        raise error
    if failed:
        raise StopQuietly(ExitCode.BAD_INPUT)


def exit_when_done(main):
    """Run main() as the script and end the process with the exit code it returns: the one way a finetune.py
    process ends. Every exit code is recorded for finetune.sh (record_exit_code; a crash, an exception out of
    main(), as 1 before its traceback) and the process group is destroyed (close_process_group) on every path.
    One of several ranks (torchrun) that finished its work (exit 0) then leaves with os._exit once its output is
    flushed: close_process_group() made gloo's abort at interpreter shutdown rarer, not impossible (a ZeRO-3 run
    that had saved its model still ended "terminate called without an active exception" now and then, as C++
    threads were torn down), and nothing is left for the interpreter to do. A rank that stops with a code of
    finetune_exit_codes leaves the ordinary way: torchrun stops the other ranks when one exits non-zero, and the
    slower exit leaves them the time to write their own line and code."""
    import logging
    import sys

    try:
        code = int(main() or 0)
    except Exception:
        record_exit_code(1)
        raise
    finally:
        close_process_group()
    record_exit_code(code)
    if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    sys.exit(code)


def setup_sequence_parallel(training_args, world, attn, packing, text_config):
    """Refuse what Ulysses cannot run (exactly) before anything is loaded; else set the Trainer's
    parallelism_config. world: the number of processes; text_config(): the model's (text) config."""
    n = training_args.sequence_parallel_size
    if n == 1:
        return
    if world % n:
        raise ValueError(f"--sequence_parallel_size {n} must divide the number of processes ({world}): launch a "
                         f"multiple of {n} processes (torchrun --nproc_per_node / finetune.sh GPUS_PER_NODE, "
                         "NNODES) or lower it.")
    if not training_args.deepspeed:
        raise ValueError("--sequence_parallel_size needs DeepSpeed: add --deepspeed ds_config_zero2.json "
                         "(or ds_config_zero3.json).")
    if attn not in SP_ATTENTION:
        raise ValueError(f"--sequence_parallel_size needs --attn_implementation {' or '.join(SP_ATTENTION)} "
                         f"(got {attn}): Ulysses drops the attention mask and relies on causal kernels.")
    if packing and not attn.startswith("flash_attention"):
        raise ValueError(f"--packing true with --sequence_parallel_size needs flash-attention: with {attn}, "
                         "Ulysses attends causally over the whole packed row, across sample boundaries. "
                         "Use --packing false (padding is exact) or --attn_implementation flash_attention_2.")
    config = text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % n or (kv_heads % n and n % kv_heads):
        usable = [d for d in range(2, heads + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]
        raise ValueError(f"--sequence_parallel_size {n}: this model has {heads} attention heads and {kv_heads} "
                         f"key/value heads; Ulysses gives each rank heads / N of them. Use one of {usable}.")
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    training_args.parallelism_config = ParallelismConfig(
        sp_backend="deepspeed", sp_size=n,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attn))


class SameLengthInGroup:
    """A train loader whose batches are padded to the longest of the sequence-parallel group's current
    batches. DeepSpeed's adapter all-gathers the group's batches, which gloo (CPU) accepts only when all
    have the same shape; NCCL takes different lengths, so GPUs skip this."""

    def __init__(self, loader, pad):
        self.loader, self.pad = loader, pad  # pad(batch, length): the collator's padding

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # set_epoch, dataset, ...
        return getattr(self.loader, name)

    def __iter__(self):
        from deepspeed.utils import groups

        for batch in self.loader:
            length = torch.tensor([batch["input_ids"].shape[1]])
            torch.distributed.all_reduce(length, torch.distributed.ReduceOp.MAX,
                                         group=groups._get_sequence_parallel_group())
            yield self.pad(batch, int(length))


class SequenceParallelLoader:
    """What the Trainer iterates: a fresh DeepSpeed adapter per epoch (one adapter would carry the last
    epoch's unfinished iterator into the next: one update lost and the next epoch's order taken from the
    wrong epoch), the set_epoch it hides, and a fast-forward for resuming mid-epoch (accelerate's
    skip_first_batches knows only DataLoaders): the skipped micro-batches are loaded and dropped."""

    def __init__(self, new_adapter, loader, skip=0):
        self.new_adapter, self.loader, self.skip, self.set_epoch = new_adapter, loader, skip, loader.set_epoch

    def __len__(self):
        return len(self.new_adapter())

    def __iter__(self):
        adapter = iter(self.new_adapter())
        for _ in range(self.skip):
            next(adapter)
        return adapter

    def skip_first_batches(self, n):
        return SequenceParallelLoader(self.new_adapter, self.loader, n)


def sequence_parallel_loader(adapt, pad, loader, model):
    """accelerate's Ulysses adapter (`adapt`) around the train loader, equal lengths first on gloo."""
    if torch.distributed.get_backend() == "gloo":
        loader = SameLengthInGroup(loader, pad)
    return SequenceParallelLoader(functools.partial(adapt, loader, model), loader)


def gradient_divisor(training_args, sp):
    """What DDP/DeepSpeed divide the gradients summed over all ranks by: the data-parallel size, world / N.
    Except DeepSpeed 0.19's ZeRO-3 reduce-scatter (on by default), which divides by the world size even under
    sequence parallelism (stage3 __avg_scatter_grads; its all-reduce path and ZeRO-1/2 divide by world / N).
    tests/test_sequence_parallel.py checks the gradient norms of both stages against one process."""
    zero = deepspeed_config(training_args).get("zero_optimization", {})
    if sp > 1 and int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True):
        return training_args.world_size
    return training_args.world_size // sp


def batch_plan(training_args, n_samples, world=None):
    """The one place that says how a run batches: processes, data-parallel size (processes / sequence-parallel
    size), micro-batch, accumulation, global batch and optimizer steps per epoch (= the Trainer's
    ceil(ceil(N / micro / dp) / accumulation) up to the last partial step). Called again after a resume on another
    number of processes has changed the accumulation."""
    world = world or training_args.world_size
    sp, micro = training_args.sequence_parallel_size, training_args.per_device_train_batch_size
    accumulation = training_args.gradient_accumulation_steps
    dp = world // sp
    global_batch = micro * dp * accumulation
    return {"world_size": world, "sequence_parallel_size": sp, "data_parallel_size": dp,
            "per_device_batch_size": micro, "gradient_accumulation_steps": accumulation,
            "global_batch_size": global_batch, "steps_per_epoch": math.ceil(n_samples / global_batch)}


@contextlib.contextmanager
def skip_first_batches_routed_to(loader):
    """The Trainer fast-forwards a resumed epoch with transformers.trainer.skip_first_batches (accelerate's),
    which rebuilds a plain DataLoader; for the duration of one epoch, route it to `loader`'s own
    skip_first_batches (the sequence-parallel loader knows how to skip its micro-batches)."""
    import transformers.trainer as hf_trainer

    skip = hf_trainer.skip_first_batches
    hf_trainer.skip_first_batches = lambda dl, n: dl.skip_first_batches(n) if dl is loader else skip(dl, n)
    try:
        yield
    finally:
        hf_trainer.skip_first_batches = skip


# ---------------------------------------------------------------------------------------------
# Resume on another number of processes: DeepSpeed universal checkpoints (used by finetune_preemption.py)
# ---------------------------------------------------------------------------------------------


def convert_to_universal(input_folder, output_folder):
    """DeepSpeed's ds_to_universal, called as its command line would (it has no function API): a namespace of
    its argparse options."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=input_folder, output_folder=output_folder, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # ZeRO-1/2 record no layout info: plain data parallel
    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints; errors still raise
        ds_to_universal.main(args)


def load_universal_on_resume(training_args):
    """Switch the DeepSpeed config to loading the universal checkpoint, rebuilt as the Trainer does for
    hyperparameter sweeps so that its "auto" batch values follow the (rescaled) accumulation."""
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    ds = deepspeed_config(training_args)
    training_args.deepspeed = {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}
    training_args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(training_args.deepspeed)
    training_args.hf_deepspeed_config.trainer_config_process(training_args)
    training_args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=training_args.hf_deepspeed_config)


def unshare_adam_step(optimizer):
    """DeepSpeed 0.19's ZeRO-3 universal load gives all parameter groups ONE `step` tensor, which torch's Adam
    then increments in place once per group: bias correction drifts. One tensor per state again."""
    while optimizer is not None:
        for opt_state in getattr(optimizer, "state", {}).values():
            if isinstance(opt_state, dict) and torch.is_tensor(opt_state.get("step")):
                opt_state["step"] = opt_state["step"].clone()
        optimizer = getattr(optimizer, "optimizer", None)


# ---------------------------------------------------------------------------------------------
# The library internals finetune relies on
# ---------------------------------------------------------------------------------------------
# Requirements are ranges, so an upgrade can change any of these. Each entry of library_internals.json: what is
# used, where, why, the version it was checked against, the tests that cover its behaviour (not only its shape)
# and the name of its probe below: a function (tests/test_library_internals.py calls it) that is true while the
# shape relied on is still there. LIBRARY_INTERNALS joins the two.


def _has(obj_path, *names):
    import importlib

    module, _, attr = obj_path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return all(hasattr(obj, n) for n in names)


def _params(obj_path):
    import inspect

    module, _, attr = obj_path.partition(":")
    obj = __import__(module, fromlist=["_"])
    for part in attr.split("."):
        obj = getattr(obj, part)
    return list(inspect.signature(obj).parameters)


def _source_has(obj_path, text):
    import inspect

    module, _, attr = obj_path.partition(":")
    obj = __import__(module, fromlist=["_"])
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return text in inspect.getsource(obj)


_PROBES = {}


def _probe(fn):
    """A probe of library_internals.json: true while the shape its entry relies on is still there."""
    _PROBES[fn.__name__] = fn
    return fn


@_probe
def probe_setup_devices_cached_property():
    return (isinstance(vars(__import__("transformers").TrainingArguments).get("_setup_devices"),
                       functools.cached_property)
            and "use_configured_state" in _dataclass_fields("transformers.trainer_pt_utils:AcceleratorConfig"))


@_probe
def probe_train_sampler_lengths():
    return (_params("transformers:Trainer._get_train_sampler") == ["self", "train_dataset"]
            and _source_has("transformers.trainer_pt_utils:LengthGroupedSampler.__init__", "self.lengths"))


@_probe
def probe_resumed_dataloader():
    if hasattr(__import__("transformers").Trainer, "get_resumed_dataloader"):  # transformers >= 5.25
        return (_params("transformers:Trainer.get_resumed_dataloader") == ["self", "dataloader", "num_batches"]
                and _source_has("transformers:Trainer._run_epoch", "self.get_resumed_dataloader("))
    return ("train_dataloader" in _params("transformers:Trainer._run_epoch")
            and _has("transformers.trainer", "skip_first_batches")
            and _source_has("transformers:Trainer._run_epoch", "skip_first_batches("))


@_probe
def probe_get_batch_samples():
    return _params("transformers:Trainer.get_batch_samples") == ["self", "epoch_iterator", "num_batches", "device"]


@_probe
def probe_loss_is_scaled_for_ga():
    return _source_has("transformers:Trainer.training_step", "loss_is_scaled_for_ga")


@_probe
def probe_evaluation_loop_prefix():
    return _params("transformers:Trainer.evaluation_loop")[5:6] == ["metric_key_prefix"]


@_probe
def probe_chat_template_renderer():
    return (_has("transformers.utils.chat_template_utils", "_compile_jinja_template", "_alias_reasoning_fields",
                 "_plain_template_data")
            and _jinja_template_has("context_class", "concat", "handle_exception", "root_render_func", "blocks",
                                    "globals"))


@_probe
def probe_ulysses_dl_adapter():
    return _source_has("accelerate:Accelerator", "deepspeed_ulysses_dl_adapter")


@_probe
def probe_sequence_parallel_group():
    return _has("deepspeed.utils.groups", "_get_sequence_parallel_group")


@_probe
def probe_zero3_avg_scatter_grads():
    return _has("deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3",
                "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads")


@_probe
def probe_ds_to_universal_main():
    return (_params("deepspeed.checkpoint.ds_to_universal:main") == ["args"]
            and all(_source_has("deepspeed.checkpoint.ds_to_universal:", f"args.{o}") for o in
                    ("input_folder", "output_folder", "num_extract_workers", "num_merge_workers", "strict",
                     "keep_temp_folder", "inject_missing_state")))


@_probe
def probe_trainer_config_process():
    return _has("transformers.integrations.deepspeed:HfTrainerDeepSpeedConfig", "trainer_config_process")


@_probe
def probe_adam_step_in_place():
    return (_source_has("torch.optim.adam:_single_tensor_adam", "step_t += 1")
            or _source_has("torch.optim.adam:_single_tensor_adam", "step_t.add_(1)"))


@_probe
def probe_peft_save_embedding_layers():
    return ("save_embedding_layers" in _params("peft:PeftModel.save_pretrained")
            and _source_has("transformers:Trainer._save", "self.model.save_pretrained("))


@_probe
def probe_get_grad_norm():
    return _params("transformers:Trainer._get_grad_norm")[:3] == ["self", "model", "grad_norm"]


@_probe
def probe_save_checkpoint():
    return (_params("transformers:Trainer._save_checkpoint")[:3] == ["self", "model", "trial"]
            and "trial" in _params("transformers:Trainer._get_output_dir"))


@_probe
def probe_load_optimizer_and_scheduler():
    return (_params("transformers:Trainer._load_optimizer_and_scheduler")[:2] == ["self", "checkpoint"]
            and _source_has("torch.optim.lr_scheduler:LRScheduler", "self._last_lr")
            and _source_has("torch.optim.lr_scheduler:LRScheduler", "self.base_lrs"))


@_probe
def probe_linear4bit_repacks():
    return _source_has("bitsandbytes.nn:Linear4bit.forward", "not self.training")


@_probe
def probe_known_notices_loggers():
    return all(_module_exists(name) for name in KNOWN_NOTICES if name != "DeepSpeed")


@_probe
def probe_router_logits_recorder():
    from transformers.models.qwen3_moe import modeling_qwen3_moe as m

    recorder = m.Qwen3MoeModel._can_record_outputs["router_logits"]
    return recorder.target_class is m.Qwen3MoeTopKRouter and recorder.index == 0


@_probe
def probe_attention_support_flags():
    import transformers

    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(transformers.GptOssConfig, None)
    return cls is not None and cls._supports_sdpa is False and hasattr(cls, "_supports_flash_attn")


@_probe
def probe_peft_param_wrapper():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper.__name__ == "ParamWrapper"


@_probe
def probe_load_from_checkpoint():
    return (_params("transformers:Trainer._load_from_checkpoint")[:3] == ["self", "resume_from_checkpoint", "model"]
            and _source_has("transformers:Trainer._load_from_checkpoint", "load_state_dict(state_dict, False)"))


LIBRARY_INTERNALS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "library_internals.json")


def _library_internals(path=LIBRARY_INTERNALS_FILE):
    """library_internals.json's entries, each with its probe function in place of the probe's name. An entry
    naming no probe, a probe no entry names, or an entry with another set of fields stops the import here."""
    with open(path) as f:
        entries = json.load(f)
    fields = {"what", "where", "why", "checked", "tested_by", "probe"}
    for e in entries:
        if set(e) != fields:
            raise ValueError(f"{path}: the entry {e.get('what')!r} has the fields {sorted(e)}; an entry has exactly "
                             f"{sorted(fields)}.")
        if e["probe"] not in _PROBES:
            raise ValueError(f"{path}: the entry {e['what']!r} names the probe {e['probe']!r}, which "
                             "finetune_distributed.py does not define (an @_probe function of that name).")
    unused = set(_PROBES) - {e["probe"] for e in entries}
    if unused:
        raise ValueError(f"{path}: no entry names the probes {sorted(unused)} of finetune_distributed.py: add their "
                         "entries or remove the probes.")
    return [dict(e, probe=_PROBES[e["probe"]]) for e in entries]


LIBRARY_INTERNALS = _library_internals()


def _module_exists(name):
    """The module is there, or its whole package is not installed (`kernels` comes with transformers >= 5.25 only)."""
    import importlib.util

    if importlib.util.find_spec(name.split(".")[0]) is None:
        return name.split(".")[0] == "kernels"
    return importlib.util.find_spec(name) is not None


def _jinja_template_has(*names):
    import jinja2

    template = jinja2.Environment().from_string("x")
    return all(hasattr(template, n) or hasattr(template.environment, n) for n in names)


def _dataclass_fields(obj_path):
    import dataclasses

    module, _, attr = obj_path.partition(":")
    return [f.name for f in dataclasses.fields(getattr(__import__(module, fromlist=["_"]), attr))]
