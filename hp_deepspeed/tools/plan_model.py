"""What the memory planner measures of the model: parameter counts and the conditioning's memory.

Owns: :class:`ModelSpec` and how it is filled: the trainer's model (``hyperprompt_t5.build_model``)
built on the meta device and counted, and the task conditioning's generator run on the meta device
under a saved-tensors hook and a :class:`StorageTracker`, which see exactly what autograd keeps
and allocates, whatever the variant. Nothing is allocated and no weights are read, so T5-XXL
takes a second.

Does not own: the formulas that turn a ``ModelSpec`` into bytes and a plan (``plan_memory.py``),
nor the table and the command line (``plan.py``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from hp_deepspeed.compat.torch import dispatch_mode_base


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about the model: counts from the meta model, dims."""

    name: str
    config: Any
    """hp_deepspeed.model.t5_config.T5Config"""
    variant: str
    """Conditioning variant (ConditioningConfig.variant); ``none`` for the plain backbone."""
    num_tasks: int
    backbone_params: int
    conditioning_params: int
    largest_layer_params: int
    """Parameters held directly by the largest single module (what ZeRO-3 gathers at once)."""
    largest_layer: str
    """Qualified name of that module, e.g. ``shared`` or ``lm_head``."""
    kv_prompt_len: int
    """Key/value prompt slots prepended in each conditioned block's self-attention."""
    kv_prompt_sides: tuple[str, ...]
    """Stacks whose blocks carry key/value prompts (``encoder``, ``decoder``)."""
    input_prompt_len: int
    """Soft-prompt tokens prepended to the encoder input (``prompt_tuning``)."""
    conditioning_saved_bytes_per_task: int = 0
    """What the conditioning generator saves for backward per distinct task of a micro-batch."""
    conditioning_saved_bytes_fixed: int = 0
    """What it saves whatever the number of tasks (e.g. a weight einsum lays out for its bmm)."""
    conditioning_bytes_per_example: int = 0
    """The generated tensors gathered to one example (prompts or adapter weights of all blocks)."""
    conditioning_backward_bytes_fixed: int = 0
    """The most the generator holds during its backward (its saved tensors, the gradients of its
    outputs and intermediates; not its parameters' gradients), whatever the number of tasks ..."""
    conditioning_backward_bytes_per_task: int = 0
    """... and per distinct task of a micro-batch."""

    @property
    def total_params(self) -> int:
        return self.backbone_params + self.conditioning_params


def count_params(module) -> tuple[int, int, str]:
    """(total parameters, parameters of the largest module, that module's name).

    The same quantities as DeepSpeed's ``model_to_params`` but safe on the meta device: that
    function deduplicates tied weights by ``data_ptr()``, which is 0 for every meta tensor, so
    it would count a meta model as one tensor. ``parameters()`` already yields a tied weight
    (``shared``/``lm_head`` of T5 v1.0) once, by identity.
    """
    total = sum(p.numel() for p in module.parameters())
    largest, largest_name = 0, ""
    for name, sub in module.named_modules():
        direct = sum(p.numel() for p in sub.parameters(recurse=False))
        if direct > largest:
            largest, largest_name = direct, name
    return total, largest, largest_name


def load_model_spec(name_or_path: str, variant: str = "hyperprompt_global", num_tasks: int = 8,
                    prompt_length: int | None = None, placement: str = "both") -> ModelSpec:
    """Build the trainer's model (``hyperprompt_t5.build_model``) on the meta device and count it.

    ``name_or_path``: a preset name (``t5-small`` ... ``google/t5-v1_1-xxl``) or a local folder
    or config.json. Nothing is allocated and no weights are read, so T5-XXL takes a second.
    The totals are those of ``hp_deepspeed.model.param_report`` (tests/tools checks it); the
    model is counted here rather than through it because the largest layer and the conditioning
    module's activations need the model itself.
    """
    from hp_deepspeed.model.builder import ModelConfig
    from hp_deepspeed.model.conditioning import ConditioningConfig
    from hp_deepspeed.model.hyperprompt_t5 import build_model

    cond_kwargs: dict[str, Any] = {"variant": variant, "placement": placement}
    if prompt_length is not None:
        cond_kwargs["prompt_length"] = prompt_length
    cond_cfg = ConditioningConfig(**cond_kwargs)
    model = build_model(ModelConfig(name_or_path=str(name_or_path), load_weights=False), cond_cfg, num_tasks,
                        device="meta")
    config, conditioning = model.config, model.conditioning
    backbone_total, largest, largest_name = count_params(model.backbone)
    cond_total, cond_largest, cond_largest_name = (0, 0, "")
    if conditioning is not None:
        cond_total, cond_largest, cond_largest_name = count_params(conditioning)
    if cond_largest > largest:
        largest, largest_name = cond_largest, f"conditioning.{cond_largest_name}"

    saved_fixed, saved_per_task, per_example = (0, 0, 0)
    backward_fixed, backward_per_task = (0, 0)
    if conditioning is not None:
        saved_fixed, saved_per_task, per_example = conditioning_activation_bytes(conditioning, num_tasks)
        backward_fixed, backward_per_task = conditioning_backward_bytes(conditioning, num_tasks)

    # The stacks the built conditioning module really conditions, when it conditions them with
    # key/value prompts (its other block-level outputs are FFN adapters).
    kv_sides = tuple(side for side, _ in conditioning.sides) if cond_cfg.kv_prompt_length else ()
    return ModelSpec(
        name=str(name_or_path), config=config, variant=variant, num_tasks=num_tasks,
        backbone_params=backbone_total, conditioning_params=cond_total,
        largest_layer_params=largest, largest_layer=largest_name,
        kv_prompt_len=cond_cfg.kv_prompt_length, kv_prompt_sides=kv_sides,
        input_prompt_len=cond_cfg.input_prompt_length,
        conditioning_saved_bytes_per_task=saved_per_task, conditioning_saved_bytes_fixed=saved_fixed,
        conditioning_bytes_per_example=per_example,
        conditioning_backward_bytes_fixed=backward_fixed, conditioning_backward_bytes_per_task=backward_per_task,
    )


def conditioning_activation_bytes(conditioning, num_tasks: int) -> tuple[int, int, int]:
    """(bytes saved for backward whatever the tasks, bytes saved per distinct task, bytes of the
    outputs per example), in bf16.

    Measured rather than derived: the generator (hypernetworks, task embeddings ...) runs on the
    meta device under a saved-tensors hook, which sees exactly what autograd keeps, whatever the
    variant. Views are counted once, by base. It runs twice, for one task and for all
    ``num_tasks``: the [tasks, ...]-shaped intermediates scale with the distinct tasks of a
    micro-batch, but not everything saved is [tasks, ...]-shaped: the HyperPrompt hypernetworks'
    einsums save a bmm-ready copy of a weight once, whatever the tasks (16 MiB for T5-XXL's
    HyperPrompt-Global). Dividing the all-task count by the tasks would spread that copy over the
    tasks and under-count a micro-batch of fewer distinct tasks than ``num_tasks`` by up to
    (1 - 1/tasks) of it. The two runs give the fixed part and the slope; with one task everything
    counts as per-task (tests/tools/test_plan.py checks both against a measured CPU run).
    """
    generator = conditioning.generator.to(torch.bfloat16)

    def saved_by(tasks: int) -> tuple[int, Any]:
        saved: dict[int, int] = {}

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if not isinstance(base, torch.nn.Parameter):
                saved[id(base)] = base.numel() * base.element_size()
            return tensor

        with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = generator(torch.arange(tasks))
        return sum(saved.values()), outputs

    all_tasks, outputs = saved_by(num_tasks)
    per_example = sum(t.numel() * t.element_size() for t in outputs.values()) // num_tasks
    if num_tasks == 1:
        return 0, all_tasks, per_example
    per_task = (all_tasks - saved_by(1)[0]) // (num_tasks - 1)
    return all_tasks - num_tasks * per_task, per_task, per_example


def conditioning_backward_bytes(conditioning, num_tasks: int) -> tuple[int, int]:
    """(fixed, per distinct task) of the most the generator holds at once during its backward:
    its saved tensors and outputs, their gradients and the backward's own temporaries, not its
    parameters' gradients (model states).

    Measured on the meta device like the saved bytes: a :class:`StorageTracker` records when each
    storage an op creates is allocated and freed, and the running maximum over the backward is
    taken. The gradients of the outputs, seeded with ones, stand in for the [tasks, ...] gradient
    the model hands the generator. Run for one task and for all, as ``conditioning_activation_bytes``.
    """
    generator = conditioning.generator.to(torch.bfloat16)
    params = [p for p in generator.parameters() if p.requires_grad]

    def peak_of(tasks: int) -> int:
        tracker = StorageTracker({id(p.untyped_storage()) for p in generator.parameters()})
        handles = [p.register_post_accumulate_grad_hook(tracker.drop_gradient) for p in params]
        try:
            with torch.device("meta"), tracker:
                outputs = [t for t in generator(torch.arange(tasks)).values() if t.requires_grad]
                grads = [torch.ones_like(t) for t in outputs]
                # The model gathers the outputs to its examples and lets them go; only their
                # gradient reaches the generator's backward.
                for tensor in outputs:
                    tracker.release(tensor)
                start = len(tracker.events)
                torch.autograd.backward(outputs, grads)
                del outputs, grads
        finally:
            for handle in handles:
                handle.remove()
        return tracker.peak_after(start)

    all_tasks = peak_of(num_tasks)
    if num_tasks == 1:
        return 0, all_tasks
    per_task = (all_tasks - peak_of(1)) // (num_tasks - 1)
    return all_tasks - num_tasks * per_task, per_task


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of an op's output (a tensor, or tuples and lists of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


class StorageTracker(dispatch_mode_base()):
    """Records when each storage an op creates is allocated and freed, and the running peak.

    A meta storage's Python object lives exactly as long as the storage, so a weak reference
    says when it is freed. Storages in ``exclude`` (the parameters') are not counted.
    """

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude
        self.live: dict[int, int] = {}  # id(storage) -> allocation number
        self.events: list[tuple[int, int]] = []  # (allocation number, +bytes or -bytes)
        self.ignored: set[int] = set()  # allocations that are parameter gradients

    def _free(self, key: int, uid: int, nbytes: int) -> None:
        if self.live.get(key) == uid:
            del self.live[key]
            self.events.append((uid, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key, nbytes = id(storage), storage.nbytes()
            if key not in self.exclude and key not in self.live:  # not a view or a parameter
                uid = len(self.events)
                self.live[key] = uid
                self.events.append((uid, nbytes))
                weakref.finalize(storage, self._free, key, uid, nbytes)
        return out

    def release(self, tensor) -> None:
        """Count ``tensor``'s storage as freed from now on (the model does not keep it)."""
        key = id(tensor.untyped_storage())
        uid = self.live.pop(key, None)
        if uid is not None:
            self.events.append((uid, -tensor.untyped_storage().nbytes()))

    def drop_gradient(self, param) -> None:
        uid = self.live.get(id(param.grad.untyped_storage()))
        if uid is not None:
            self.ignored.add(uid)
        param.grad = None

    def peak_after(self, start: int) -> int:
        live = sum(n for uid, n in self.events[:start] if uid not in self.ignored)
        peak = live
        for uid, n in self.events[start:]:
            if uid not in self.ignored:
                live += n
                peak = max(peak, live)
        return peak
