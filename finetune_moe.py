"""Mixture-of-experts models: the router's load-balancing loss over the real tokens, the expert-balance figure, the
fused expert parameters that LoRA must reach, and the parameter counts (total and active).

    moe = MoeRouting.of(model, coef_flag)    # None for a dense model
    with moe.recording(real):               # real: [batch, seq] bool, the non-padding tokens of the micro-batch
        outputs = model(**inputs)
    moe.router_loss                          # Switch-Transformer load-balancing loss over the real tokens
    moe.take_metrics(reduce)                 # {"router_loss": mean, "expert_maxvio": ...} since the last call

finetune.py adds coef x router_loss to each micro-batch's loss (FinetuneTrainer.compute_loss) and logs the figures.
The loss is the one transformers' MoE models compute with output_router_logits=True (load_balancing_loss_func: the
same formula in every family), but counted over the tokens that are real: transformers' version is handed the batch's
attention mask, which padding-free packing and sequence parallelism do not have (or have for another shape).

The balance figure, expert_maxvio (the MaxVio of Wang et al. 2024, "Auxiliary-loss-free load balancing"): per MoE
layer, over the real tokens of a logging interval, (top-k assignments of the busiest expert / the mean per expert) - 1;
averaged over the layers. 0: every expert gets the same share; num_experts / top_k - 1: every token goes to the same
top_k experts (collapsed routing).
"""

import contextlib
import math

import torch
import torch.nn.functional as F

# config attribute names of the experts' count and the experts per token across families (transformers 5)
_NUM_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_top_k", "top_k")


def _first(config, names):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def moe_shape(config):
    """-> (num_experts, top_k) of an MoE model's (text) config, None for a dense one."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    experts, top_k = _first(config, _NUM_EXPERTS), _first(config, _TOP_K)
    return (experts, top_k) if experts and experts > 1 and top_k else None


def router_classes(model):
    """The module classes whose output[index] are the router logits, as the model declares them for its own
    output_router_logits (transformers' _can_record_outputs["router_logits"]: a library internal, see
    library_internals.json) -> {class: index}."""
    found = {}
    for module in model.modules():
        recorder = (getattr(type(module), "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is None:
            continue
        if isinstance(recorder, type):
            found[recorder] = 0
        elif getattr(recorder, "target_class", None) is not None:
            found[recorder.target_class] = recorder.index or 0
    return found


def router_modules(model):
    """[(name, module, output index)] of every router, in layer order."""
    classes = router_classes(model)
    return [(name, m, classes[type(m)]) for name, m in model.named_modules() if type(m) in classes]


def load_balancing_loss(layer_logits, real, num_experts, top_k):
    """The Switch-Transformer loss num_experts x sum_e f_e P_e over all layers' real tokens (f_e: share of top-k
    assignments to expert e, P_e: its mean router probability), as transformers' load_balancing_loss_func computes
    it, with `real` ([tokens] bool) selecting the rows. Also -> the per-layer assignment counts [layers, E]."""
    counts, probs, rows = [], 0.0, 0
    for logits in layer_logits:
        logits = logits.reshape(-1, logits.shape[-1])[real.reshape(-1).to(logits.device)]
        p = F.softmax(logits.float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices
        counts.append(torch.bincount(chosen.reshape(-1).detach(), minlength=num_experts).double())
        probs = probs + p.sum(0)
        rows += p.shape[0]
    counts = torch.stack(counts) if counts else torch.zeros(0, num_experts, dtype=torch.float64)
    if rows == 0:
        return None, counts
    share = counts.sum(0).to(probs.device, torch.float32) / rows
    return num_experts * torch.sum(share * probs / rows), counts


def maxvio(counts):
    """expert_maxvio from [layers, E] assignment counts (see the module docstring); None without any token."""
    per_layer = counts.sum(1)
    used = per_layer > 0
    if not used.any():
        return None
    mean = per_layer[used] / counts.shape[1]
    return float((counts[used].max(1).values / mean - 1).mean())


class MoeRouting:
    """The routers of one model, recorded per forward, and the figures since the last logging."""

    def __init__(self, routers, num_experts, top_k, coef):
        self.routers, self.num_experts, self.top_k, self.coef = routers, num_experts, top_k, coef
        self.router_loss, self._logits = None, None
        self._loss_sum, self._n = 0.0, 0
        self._counts = None  # [MoE layers, experts], from the first forward (a peft copy of a router never runs)

    @classmethod
    def of(cls, model, coef=None):
        """None for a dense model (or one whose routers transformers does not declare). coef: --router_aux_loss_coef,
        None for the model's own router_aux_loss_coef (0 when its config has none)."""
        shape = moe_shape(model.config)
        routers = router_modules(model) if shape else []
        if not routers:
            return None
        if coef is None:
            coef = float(getattr(model.config.get_text_config(), "router_aux_loss_coef", 0.0) or 0.0)
        return cls(routers, *shape, coef)

    def _hook(self, index):
        def record(module, args, output):
            if self._logits is not None:  # a forward of ours; not the backward's recomputation (checkpointing)
                self._logits.append(output[index] if isinstance(output, (tuple, list)) else output)
        return record

    @contextlib.contextmanager
    def recording(self, real):
        """Records every router's logits during the forward inside; then sets router_loss (a tensor with its graph
        when coef > 0, else detached) and counts the assignments."""
        self._logits, self.router_loss = [], None
        hooks = [m.register_forward_hook(self._hook(index), prepend=True) for _, m, index in self.routers]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()
            logits, self._logits = self._logits, None
        if not logits:
            return
        with contextlib.nullcontext() if self.coef > 0 else torch.no_grad():
            loss, counts = load_balancing_loss(logits, real, self.num_experts, self.top_k)
        if loss is None:
            return
        self.router_loss = loss if self.coef > 0 else loss.detach()
        self._loss_sum += float(loss.detach())
        self._n += 1
        if self._counts is None:
            self._counts = torch.zeros_like(counts, device="cpu")
        if self._counts.shape == counts.shape:
            self._counts += counts.cpu()

    def step_term(self, micro_batches_in_step):
        """What this micro-batch adds to the loss: coef x router_loss / the micro-batches of the step on all ranks
        (so that the step's objective gets coef x their mean router loss); 0 when nothing is added."""
        if self.coef <= 0 or self.router_loss is None:
            return 0.0
        return self.coef * self.router_loss / micro_batches_in_step

    def take_metrics(self, reduce=lambda t: t):
        """{"router_loss": mean over the micro-batches since the last call, "expert_maxvio": over their tokens},
        summed over ranks by `reduce` (a tensor -> tensor all-reduce)."""
        counts = self._counts if self._counts is not None else torch.zeros(len(self.routers), self.num_experts,
                                                                           dtype=torch.float64)
        sums = reduce(torch.cat([torch.tensor([self._loss_sum, self._n], dtype=torch.float64), counts.reshape(-1)]))
        self._loss_sum, self._n = 0.0, 0
        if self._counts is not None:
            self._counts.zero_()
        if sums[1] == 0:
            return {}
        figure = maxvio(sums[2:].reshape(counts.shape))
        return {"router_loss": float(sums[0] / sums[1]), **({"expert_maxvio": figure} if figure is not None else {})}


# ---------------------------------------------------------------------------------------------
# Parameters: what LoRA reaches, total and active counts
# ---------------------------------------------------------------------------------------------


def fused_expert_parameters(model):
    """Names (suffixes peft's target_parameters matches, e.g. "mlp.experts.gate_up_proj") of the experts' fused
    weights: 3-d parameters whose first dimension is the number of experts. Biases (2-d) are not LoRA targets."""
    shape = moe_shape(model.config)
    if not shape:
        return []
    names = set()
    for name, p in model.named_parameters():
        full = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitions: the parameter's own shape is [0] then
        if len(full) == 3 and full[0] == shape[0]:
            parts = name.split(".")
            names.add(".".join(parts[-3:]))  # <block>.<experts module>.<parameter>: the same in every layer
    return sorted(names)


def expert_parameter_count(model):
    """Parameters of all experts together: in every module holding fused expert tensors (3-d, leading dimension the
    number of experts), those tensors and their per-expert biases."""
    shape = moe_shape(model.config)
    if not shape:
        return 0
    count = 0
    for module in model.modules():
        own = [getattr(p, "ds_shape", p.shape) for p in module.parameters(recurse=False)]
        own = [s for s in own if tuple(s[:1]) == (shape[0],)]
        if any(len(s) == 3 for s in own):
            count += sum(math.prod(s) for s in own)
    return count


def lora_module_targets(model, names):
    """--lora_target_modules of a model with fused experts less the names that are no module of it (the experts'
    gate_proj, up_proj, down_proj are fused parameters in transformers 5, reached through target_parameters): peft
    0.21 would otherwise rewrite them by its table of transformers-4 names (families it lists only) and warn about
    its rank pattern."""
    if not fused_expert_parameters(model):
        return names
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [n for n in names if n in leaves]


def router_parameter_names(model):
    """Full names of the routers' parameters."""
    return [f"{name}.{p}" if name else p for name, m, _ in router_modules(model) for p, _ in m.named_parameters()]


def active_parameters(config, total, expert_params):
    """Parameters one token uses: the total less the experts it is not routed to. expert_params: the parameters
    of all experts together (fused or not)."""
    shape = moe_shape(config)
    if not shape or not expert_params:
        return total
    experts, top_k = shape
    return int(total - expert_params * (experts - top_k) / experts)


def reached_summary(model, router_trained):
    """One log line of what LoRA reached: attention, dense MLP, experts (fused tensors), router trained or frozen."""
    attention = dense = experts = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or not len(getattr(module, "lora_A", {})):
            continue
        if type(module).__name__ == "ParamWrapper":
            experts += 1
        elif "attn" in name or "attention" in name:
            attention += 1
        else:
            dense += 1
    router = "trained" if router_trained else "frozen"
    expert_targets = sorted({n for c in model.peft_config.values() for n in (c.target_parameters or ())})
    return (f"LoRA reaches: attention {attention} modules, dense MLP {dense} modules, experts {experts} fused tensors "
            f"({', '.join(expert_targets) or 'none'}), router {router}")


def router_module_names(model):
    """The routers' module names as suffixes shared by every layer (e.g. "mlp.gate"): peft's modules_to_save."""
    return sorted({".".join(name.split(".")[-2:]) for name, _, _ in router_modules(model)})


def lora_targets(model, target_modules, use_dora, router_trained):
    """LoraConfig's targets: --lora_target_modules (lora_module_targets), the fused expert tensors found in the model
    (target_parameters), the routers as whole modules when they train (modules_to_save)."""
    experts = fused_expert_parameters(model)
    if experts and use_dora:
        raise ValueError(f"--use_dora: peft 0.21 has no DoRA for the fused expert weights of this MoE model "
                         f"({', '.join(experts)}); use plain LoRA (drop --use_dora).")
    modules = target_modules if isinstance(target_modules, str) else lora_module_targets(model, target_modules)
    return {"target_modules": modules, "target_parameters": experts or None,
            "modules_to_save": router_module_names(model) if router_trained else None}


def prepare_moe(model, training_args):
    """Before training an MoE model: its own router loss off (ours counts the real tokens; transformers' needs an
    attention mask that packing and sequence parallelism lack), --freeze_router (default: frozen with LoRA, trained
    in full fine-tuning; frozen: requires_grad off) -> whether the routers train."""
    if not moe_shape(model.config):
        return False
    model.config.output_router_logits = False
    freeze = training_args.use_lora if training_args.freeze_router is None else training_args.freeze_router
    if freeze:
        for _, module, _ in router_modules(model):
            module.requires_grad_(False)
    return not freeze


def choose_attention(load_config, quiet=False):
    """--attn_implementation auto: flash_attention_2 on GPU with flash-attn installed, else sdpa, of what the model's
    class supports (supported_attention), else eager (e.g. gpt-oss), said in the log. load_config: -> its config."""
    import importlib.util

    try:
        supported = supported_attention(load_config())
    except (OSError, ValueError):  # --show_masking reads no config: the choice is not used
        supported = ("flash_attention_2", "sdpa", "eager")
    flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    choice = next(a for a in ("flash_attention_2", "sdpa", "eager") if a in supported and (flash or a[0] != "f"))
    if choice == "eager" and not quiet:
        from finetune_console import log0

        log0("attention: eager (this model does not support sdpa; set --attn_implementation to choose)")
    return choice


def supported_attention(config):
    """The attention implementations the model's class declares it supports (transformers' _supports_sdpa /
    _supports_flash_attn class attributes: a library internal, see library_internals.json), eager always.
    A class transformers does not map (remote code) -> all of them: its own loading decides."""
    import transformers

    cls = transformers.MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is None:
        return ("flash_attention_2", "sdpa", "eager")
    return tuple(a for a, ok in (("flash_attention_2", getattr(cls, "_supports_flash_attn", False)),
                                 ("sdpa", getattr(cls, "_supports_sdpa", False)), ("eager", True)) if ok)


def reload_converted_weights(model, checkpoint):
    """Resume of a full fine-tune: transformers 5.25's Trainer loads a checkpoint's model.safetensors into the model
    as it is (strict=False), but an MoE model is saved in its checkpoint layout (one tensor per expert: experts.0
    .gate_proj.weight ...) while it holds fused tensors (experts.gate_up_proj), so the experts silently stayed as
    they were at the start. Their trained values are loaded here the way from_pretrained converts them. LoRA
    checkpoints (adapters) and DeepSpeed ones (its own partitions) are not concerned. -> whether it loaded them."""
    import glob
    import os

    if not moe_shape(model.config) or hasattr(model, "peft_config") or not fused_expert_parameters(model):
        return False
    if not glob.glob(os.path.join(checkpoint, "model*.safetensors")):
        return False
    loaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor, or an error
    return True
