"""Non-finite numbers stop a run instead of training on to NaN weights.

``NonFiniteGuard`` owns the rule the trainer applies to every optimizer step: a step is
*non-finite* when its loss (on any rank) or its global gradient norm is inf/NaN, or when
DeepSpeed skipped its update because it found non-finite gradients ("OVERFLOW"). While the
latest step is non-finite no checkpoint is written (the weights may already be NaN, or hold an
update that was not applied); ``training.max_nonfinite_steps`` such steps in a row stop the run
with one line and the exit code ``EXIT_NON_FINITE``, leaving the last finite checkpoint as
``latest``. Skipped updates are counted from the start of the process and logged with each train
record (``skipped_updates``): the trainer's step counter counts global batches consumed, and a
skipped step is one whose batch was consumed without an update.

The evidence stays on the device until it is needed. ``observe`` runs every step and only keeps
references to the step's loss and gradient norm tensors (a reading of the loss would make the
host wait for the step, and the GPU would then idle while the host queues the next one).
``settle`` reads every step observed since the previous settle at once, with one all-reduce and
one host read, replays them in order (the same warnings, counts and verdicts as a per-step
check) and raises ``NonFiniteLoss`` when ``max_nonfinite_steps`` in a row were reached. The
trainer settles at its check points: log, eval and save steps, the last step and a preemption
stop, always before deciding to evaluate or save; so a stop comes at the first check point at
or after the step that completed the run of bad steps, and ``finite`` refuses to answer while
observed steps are unread. (DeepSpeed 0.19.8's ZeRO optimizers read the validity of the
gradient norm on the host inside ``step`` under fp16, bf16 and fp32 alike, before they queue the
update; a read here, after ``step``, also waited for the update, and for a collective.)

It does not own the loss or the step (the trainer's ``train_step``), nor what is saved.
"""

from __future__ import annotations

import logging
import math

import torch

from hp_deepspeed.launching import collectives

log = logging.getLogger(__name__)

# sysexits' EX_DATAERR: the run diverged; unlike 75 (preempted) a requeue would not help.
EXIT_NON_FINITE = 65


class NonFiniteLoss(RuntimeError):
    """Training stopped on non-finite numbers; the message is the one line to print."""


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, verbose: bool = True):
        self.max_consecutive = max_consecutive
        self.verbose = verbose  # rank 0 only: every rank reaches the same verdict
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.skipped_updates = 0
        # Per observed step not yet settled: (step, its loss tensor, its gradient norm tensor or
        # None, the host-known norm verdict or None, update applied, skipped updates so far).
        self._unread: list[tuple] = []

    @property
    def pending(self) -> int:
        """Steps observed but not yet settled."""
        return len(self._unread)

    @property
    def finite(self) -> bool:
        """Whether the latest step left finite, up-to-date weights (a checkpoint may be written).
        Only known after ``settle``: asking earlier is a bug that could save non-finite state."""
        if self._unread:
            raise RuntimeError(f"non-finite guard asked about step {self._unread[-1][0]} before settle()")
        return self.consecutive == 0

    def observe(self, step: int, loss_sum: torch.Tensor, grad_norm, update_applied: bool) -> None:
        """Record optimizer step ``step`` from this rank's summed loss (a scalar tensor on the
        device), the global gradient norm (a tensor, a number, or ``None`` where DeepSpeed does
        not compute one) and whether DeepSpeed applied the update. Keeps references only: no
        host read, no collective, no kernel."""
        norm, norm_known = None, None
        if torch.is_tensor(grad_norm):
            norm = grad_norm.detach()
        else:
            norm_known = grad_norm is not None and not math.isfinite(float(grad_norm))
        if not update_applied:
            self.skipped_updates += 1
        self._unread.append((step, loss_sum.detach().reshape(()), norm, norm_known, update_applied,
                             self.skipped_updates))

    def settle(self) -> None:
        """Read the steps observed since the last settle (collective: every rank, at the same
        steps), apply the rule to each in order, and raise ``NonFiniteLoss`` at the step that
        completes ``max_nonfinite_steps`` in a row. Only this reads the device."""
        if not self._unread:
            return
        unread, self._unread = self._unread, []
        device = unread[0][1].device
        loss_bad = ~torch.isfinite(torch.stack([entry[1].float() for entry in unread]))
        norms = [(i, entry[2]) for i, entry in enumerate(unread) if entry[2] is not None]
        norm_bad = torch.zeros_like(loss_bad)
        if norms:
            values = torch.stack([norm.to(device, torch.float32).reshape(()) for _, norm in norms])
            norm_bad[torch.tensor([i for i, _ in norms], device=device)] = ~torch.isfinite(values)
        # The loss flag differs between ranks; the gradient norm is global already.
        flags = collectives.all_reduce(torch.stack([loss_bad, norm_bad], dim=1).int(), "max").tolist()
        for (step, _, _, norm_known, applied, skipped), (bad_loss, bad_norm) in zip(unread, flags):
            reasons = []
            if bad_loss:
                reasons.append("loss")
            if bad_norm or norm_known:
                reasons.append("gradient norm")
            if not reasons and applied:
                if self.consecutive and self.verbose:
                    log.warning("step %d: finite again after %d non-finite step(s)", step, self.consecutive)
                self.consecutive, self.first_bad_step = 0, None
                continue
            self.consecutive += 1
            self.first_bad_step = self.first_bad_step or step
            if self.verbose:
                log.warning("step %d: non-finite %s%s (%d in a row; training stops at %d); no checkpoint until a "
                            "finite step", step, " and ".join(reasons) or "gradients",
                            "" if applied else f", update skipped ({skipped} so far)",
                            self.consecutive, self.max_consecutive)
            if self.consecutive >= self.max_consecutive:
                raise NonFiniteLoss(self.stop_line(unread[-1][0], reached=step))

    def stop_line(self, step: int, reached: int | None = None) -> str:
        """The one line for a stop at check point ``step``; ``reached`` is the step that completed
        the run of bad steps, where it is earlier than the check point."""
        late = f"; reached at step {reached}, checked at step {step}" if reached not in (None, step) else ""
        return (f"training stopped at step {step}: non-finite loss or gradients for {self.consecutive} step(s) in a "
                f"row since step {self.first_bad_step} (training.max_nonfinite_steps={self.max_consecutive}{late}); "
                f"lower optim.lr or check the data; no checkpoint was written from step {self.first_bad_step} on")
