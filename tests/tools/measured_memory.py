"""Activation memory of a real forward + backward on the CPU, measured, for the planner's tests.

``measure_step`` runs one training step of a model (forward with labels, ``loss.backward()``)
under ``LiveStorages``, a dispatch mode that sees every tensor every ATen op returns -- in the
forward, in the backward, and in the recomputation of checkpointed blocks -- and follows each
new storage until it is freed (a weak reference to the storage; torch keeps a storage's Python
object alive as long as the storage is). Each allocation and free is an event, so the live bytes
are known after every op, and:

* ``saved``: the bytes alive when the forward returns -- what autograd saved for backward (or
  what a checkpoint keeps as block inputs, which no saved-tensor hook sees for the non-reentrant
  flavour), plus what the caller holds (the logits), as ``ActivationEstimate.saved`` means it;
* ``peak``: the running maximum over the forward and the whole backward.

Parameters are not activations: their storages are excluded, and so are their gradients (the
planner counts gradients in the ZeRO-3 model states): every gradient is dropped as soon as it is
accumulated, as ZeRO-3 reduces and frees it, and retroactively removed from the event stream.
So are the partial gradients of a parameter used twice (the shared embedding by both stacks, and
by the tied lm_head), which autograd holds until the last use's gradient arrives: a hook on every
node of the graph that feeds a parameter's AccumulateGrad marks what the node hands it.
Storage sizes are nbytes, not the allocator's rounded blocks: the planner's unit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveStorages(TorchDispatchMode):
    """Every storage created by an op while active: allocation and free events, in order."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude  # data_ptrs never counted (parameter storages)
        self.live: dict[int, int] = {}  # data_ptr -> id of the allocation now at that address
        self.events: list[tuple[int, int]] = []  # (allocation id, +nbytes or -nbytes)
        self.ignored: set[int] = set()  # allocation ids removed afterwards (parameter gradients)
        self.forward_end = 0  # len(events) when the forward returned
        self._refs: list[weakref.ref] = []

    def _freed(self, ptr: int, uid: int, nbytes: int) -> None:
        if self.live.get(ptr) == uid:
            del self.live[ptr]
            self.events.append((uid, -nbytes))

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.exclude or ptr in self.live:
            return  # a view, an in-place result, or a parameter
        uid = len(self.events)
        self.live[ptr] = uid
        self.events.append((uid, nbytes))
        self._refs.append(weakref.ref(storage, lambda _, p=ptr, u=uid, n=nbytes: self._freed(p, u, n)))

    def ignore(self, tensor: torch.Tensor | None) -> None:
        """Remove the allocation that holds ``tensor`` from the whole event stream."""
        if tensor is None:
            return
        uid = self.live.get(tensor.untyped_storage().data_ptr())
        if uid is not None:
            self.ignored.add(uid)

    def _ignoring(self, indices: list[int]):
        def hook(grad_inputs, grad_outputs):  # after the node ran: grad_inputs are its results
            for i in indices:
                self.ignore(grad_inputs[i])

        return hook

    def ignore_parameter_gradients(self, root) -> None:
        """Hook every node of the graph under ``root`` that hands a gradient to a parameter's
        AccumulateGrad, so that the gradient is ignored the moment it is made."""
        seen, stack = set(), [root]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            to_params = [i for i, (child, _) in enumerate(node.next_functions)
                         if child is not None and type(child).__name__ == "AccumulateGrad"]
            if to_params:
                node.register_hook(self._ignoring(to_params))
            stack.extend(child for child, _ in node.next_functions)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                self._track(tensor)
        return out

    def live_bytes(self, end: int | None = None) -> int:
        return sum(n for uid, n in self.events[:end] if uid not in self.ignored)

    def peak_bytes(self) -> int:
        live = peak = 0
        for uid, n in self.events:
            if uid not in self.ignored:
                live += n
                peak = max(peak, live)
        return peak


@dataclass(frozen=True)
class Measured:
    saved: int
    """Bytes alive when the forward returned."""
    peak: int
    """Most bytes alive at once during forward and backward."""


def measure_step(model, batch: int, src: int, tgt: int, num_tasks: int, seed: int = 0) -> Measured:
    """One forward (with labels) and backward of ``model`` on a random full-length batch."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    host = {
        "input_ids": torch.randint(2, vocab, (batch, src), generator=gen),
        "attention_mask": torch.ones(batch, src, dtype=torch.long),
        "labels": torch.randint(2, vocab, (batch, tgt), generator=gen),
        "task_ids": torch.arange(batch) % num_tasks,
    }
    params = list(model.parameters())
    tracker = LiveStorages({p.untyped_storage().data_ptr() for p in params})

    def drop_gradient(param):
        tracker.ignore(param.grad)
        param.grad = None

    handles = [p.register_post_accumulate_grad_hook(drop_gradient) for p in params if p.requires_grad]
    try:
        with tracker:
            # Copied inside: on a GPU the batch is a device allocation too (token ids, kept by
            # the embedding lookups).
            inputs = {k: v.clone() for k, v in host.items()}
            out = model(**inputs)
            del inputs
            tracker.forward_end = len(tracker.events)
            tracker.ignore_parameter_gradients(out.loss.grad_fn)
            out.loss.backward()
            del out
    finally:
        for handle in handles:
            handle.remove()
    return Measured(saved=tracker.live_bytes(tracker.forward_end), peak=tracker.peak_bytes())
