"""Non-finite numbers stop a run instead of training on to NaN weights.

``NonFiniteGuard`` owns the rule the trainer applies after every optimizer step: a step is
*non-finite* when its loss (on any rank) or its global gradient norm is inf/NaN, or when
DeepSpeed skipped its update because it found non-finite gradients ("OVERFLOW"). While the
latest step is non-finite no checkpoint is written (the weights may already be NaN, or hold an
update that was not applied); ``training.max_nonfinite_steps`` such steps in a row stop the
run with one line and the exit code ``EXIT_NON_FINITE``, leaving the last finite checkpoint as
``latest``. Skipped updates are counted from the start of the process and logged with each train
record (``skipped_updates``): the trainer's step counter counts global batches consumed, and a skipped
step is one whose batch was consumed without an update.

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

    @property
    def finite(self) -> bool:
        """Whether the latest step left finite, up-to-date weights (a checkpoint may be written)."""
        return self.consecutive == 0

    def observe(self, step: int, loss_sum: torch.Tensor, grad_norm, update_applied: bool) -> None:
        """Judge optimizer step ``step`` from this rank's summed loss, the global gradient norm
        (``None`` where DeepSpeed does not compute one) and whether DeepSpeed applied the update.

        Every rank reaches the same verdict: the loss flag is all-reduced and the other two are
        global already. The ``.item()`` waits for the step to finish; DeepSpeed's own overflow
        check under ZeRO waits for it the same way, every step.
        """
        bad_loss = collectives.all_reduce((~torch.isfinite(loss_sum.detach())).any().reshape(1).int(), "max")
        reasons = []
        if bad_loss.item():
            reasons.append("loss")
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            reasons.append("gradient norm")
        if not update_applied:
            self.skipped_updates += 1
        if not reasons and update_applied:
            if self.consecutive and self.verbose:
                log.warning("step %d: finite again after %d non-finite step(s)", step, self.consecutive)
            self.consecutive, self.first_bad_step = 0, None
            return
        self.consecutive += 1
        self.first_bad_step = self.first_bad_step or step
        if self.verbose:
            log.warning("step %d: non-finite %s%s (%d in a row; training stops at %d); no checkpoint until a "
                        "finite step", step, " and ".join(reasons) or "gradients",
                        "" if update_applied else f", update skipped ({self.skipped_updates} so far)",
                        self.consecutive, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLoss(self.stop_line(step))

    def stop_line(self, step: int) -> str:
        return (f"training stopped at step {step}: non-finite loss or gradients for {self.consecutive} step(s) in a "
                f"row since step {self.first_bad_step} (training.max_nonfinite_steps={self.max_consecutive}); "
                f"lower optim.lr or check the data; no checkpoint was written from step {self.first_bad_step} on")
