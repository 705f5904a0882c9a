"""Non-finite losses: skip the optimiser step on every student rank, count it, and stop after
`train.max_nonfinite_steps` skipped steps in a row.

    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
    guard.backward_step(engine, loss, step)      # instead of engine.backward(loss); engine.step()
    guard.skipped                                # steps skipped so far (metric train/nonfinite_skipped)

A NaN or inf loss on one rank would put NaN into every rank's weights through the gradient
reduction, so the decision is collective: each rank contributes its own flag to one
all-reduce and all of them skip, or none (ZeRO-3 also needs every rank to run the same
backward and step, or the collectives inside them hang).

The unit is the optimiser step. With gradient accumulation (`train.grad_accum > 1`, or a PADD
rollout batch of several micro-batches) a non-finite micro-batch makes
the whole step a skip: its own backward and those of the step's remaining micro-batches are
left out, the gradient already accumulated from the earlier ones is discarded at the step's
last micro-batch, and the optimiser does not step (no update, no lr-scheduler tick).
DeepSpeed's micro-step count still advances once per micro-batch, so its accumulation
boundaries stay on the trainer's steps.

The streak counts training steps, not optimiser steps: with `stage3.updates_per_batch > 1`
the trainer takes several optimiser steps on one rollout batch (all passing the same `step`),
and one bad batch must not use up the whole allowance. `skipped` still counts every skipped
optimiser step.
"""

from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """Too many training steps in a row had a non-finite loss."""


class NonFiniteGuard:
    def __init__(self, max_in_a_row: int):
        if max_in_a_row < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0          # optimiser steps skipped in this run (restored on resume)
        self.in_a_row = 0         # consecutive skipped steps up to the last one
        self._step_bad = False    # a micro-batch of the current optimiser step was non-finite
        self._counted = None      # the training step last counted in the streak
        self._where: list[str] = []

    # -- checkpointed state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])

    # -- the step ------------------------------------------------------------------------------
    def nonfinite_ranks(self, loss: torch.Tensor) -> list[int]:
        """Ranks of the students' world whose `loss` is NaN or inf (collective: every rank gets
        the same list)."""
        import deepspeed.comm as dist

        # On the loss's device: NCCL reduces only GPU tensors, gloo CPU ones.
        flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=loss.device)
        flags[dist.get_rank()] = (~torch.isfinite(loss.detach())).any().float()
        dist.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f > 0]

    def backward_step(self, engine, loss: torch.Tensor, step: int, scale_wrt_gas: bool = True) -> bool:
        """engine.backward(loss) and engine.step(), unless the loss is non-finite on any rank
        (or was earlier in this optimiser step): then skip both on every rank. Returns True
        when this micro-batch was skipped. Raises NonFiniteLossError at the
        `max_in_a_row`-th skipped step in a row. `step` (0-based) is only for messages.
        `scale_wrt_gas=False`: the loss is already normalised over the whole optimiser step, so
        DeepSpeed must not divide it again by the accumulation steps."""
        bad = self.nonfinite_ranks(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        if bad and not self._step_bad and step != self._counted:
            self._where.append(f"step {step + 1} on student rank{'s' if len(bad) > 1 else ''} "
                               f"{', '.join(map(str, bad))}")
        skip = self._step_bad or bool(bad)
        if not skip:
            engine.backward(loss, scale_wrt_gas=scale_wrt_gas)
            engine.step()
        elif not boundary:
            self._step_bad = True
            engine.step()  # off the accumulation boundary this only advances DeepSpeed's micro-step count
        else:
            # Last micro-batch of a skipped step: drop what earlier micro-batches accumulated and
            # count the micro-step without an optimiser step (what engine.step() would count).
            engine.optimizer.zero_grad()
            engine.micro_steps += 1
        if boundary:
            self._end_step(skip, step)
        return skip

    def _end_step(self, skipped: bool, step: int) -> None:
        self._step_bad = False
        if not skipped:
            self.in_a_row, self._where, self._counted = 0, [], None
            return
        self.skipped += 1
        if step == self._counted:  # another update on the same rollout batch: already in the streak
            return
        self._counted = step
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"non-finite loss in {self.in_a_row} training steps in a row ({'; '.join(self._where[-5:])}); "
                f"each was skipped, and train.max_nonfinite_steps={self.max_in_a_row} stops the run here; "
                "check the data of these steps, the teacher's outputs and the learning rate")
