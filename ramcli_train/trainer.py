"""The one optimisation loop that `ramcli train`, `ramcli finetune` and `ramcli distill` share.

    for each epoch, for each batch after those a resumed run already consumed: the caller's
    loss -> backward (accumulated over micro-batches) -> the schedule's learning rate, clip,
    AdamW step -> the caller's step callback -> checkpoints every `save_every` steps, at each
    epoch's end and where the run stops.

What differs between the commands stays with them: the batches of an epoch, the forward pass
that turns a batch into named loss parts, the learning-rate schedule and what else a checkpoint
holds (RNG state, config, labels). A checkpoint always holds the model, the optimizer, the step,
the epoch and the number of batches consumed in the epoch, so a run continued with `restore`
computes what the uninterrupted one would, as long as the caller's batches are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import time
import torch

from ramcli.errors import RamcliError
from ramcli.fileio import atomic_output
from ramcli.models.safeload import load_weights

CHECKPOINT_LAST = "checkpoint_last.pt"

#: (batch, whether this micro-batch completes an optimizer step) -> (loss, its named parts), or
#: None for a batch that has nothing to learn from (it takes no step)
LossFn = Callable[[Any, bool], "tuple[torch.Tensor, dict[str, torch.Tensor]] | None"]
#: (step, epoch, learning rate, loss parts averaged over the step's micro-batches)
StepFn = Callable[[int, int, float, dict[str, float]], None]


def progress_line(step: int, total: int, parts: dict[str, float], lr: float, img_per_s: float | None = None) -> str:
    """The periodic line of every training command, one format in a progress bar on a terminal
    and in a piped log, so that one grep reads the logs of `train`, `finetune` and `distill`:
    `step 40/200 loss 1.2345 (tag 0.8123, lm 0.4222) lr 1.00e-04 12.3 img/s`."""
    named = ", ".join(f"{k} {v:.4f}" for k, v in parts.items())
    rate = "" if img_per_s is None else f" {img_per_s:.1f} img/s"
    return f"step {step}/{total} loss {sum(parts.values()):.4f} ({named}) lr {lr:.2e}{rate}"


class Throughput:
    """Images trained on per second since the last reading, for the progress line."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        """The rate since the last reading (or the start), and a new window from now."""
        now = time.perf_counter()
        rate = self.images / max(now - self.start, 1e-9)
        self.start, self.images = now, 0
        return rate


def save_checkpoint(path: Path, payload: dict) -> Path:
    """Whole or not at all: a kill while saving leaves the previous checkpoint."""
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise RamcliError(f"no checkpoint to resume from: {path}")
    return load_weights(path)


def load_into(model: torch.nn.Module, state: dict, source: str | Path) -> None:
    """`state` into `model`, all of it; a checkpoint of another configuration or of an earlier
    ramcli (parameter names changed) is a one-line error, not a traceback."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise RamcliError(f"{Path(source).name} does not fit this model (another configuration, or written "
                          f"by an earlier ramcli): {first[:200]}") from None


@dataclass
class Trainer:
    """AdamW over the model's trainable parameters, stepped on the caller's schedule.

    `schedule(epoch, step)` gives the learning rate of the optimizer step about to be taken.
    The run stops after `epochs` epochs (None: no limit) or `max_steps` steps (None or 0: no
    limit), whichever comes first. `epoch_checkpoints` keeps each finished epoch as
    `checkpoint_NN.pt` beside `checkpoint_last.pt`; `extra_state()` adds to every checkpoint.
    Only the `main` process (rank 0) writes.
    """

    model: torch.nn.Module
    folder: Path
    lr: float
    weight_decay: float
    schedule: Callable[[int, int], float]
    epochs: int | None = None
    max_steps: int | None = None
    accum_steps: int = 1
    grad_clip: float = 0.0
    save_every: int = 0
    epoch_checkpoints: bool = False
    extra_state: Callable[[], dict] = dict
    main: bool = True
    step: int = field(init=False, default=0)
    epoch: int = field(init=False, default=0)
    skip: int = field(init=False, default=0)
    last_checkpoint: Path | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay)

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint: weights, optimizer moments and the place in the data."""
        load_into(self.model, state["model"], self.folder / CHECKPOINT_LAST)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.skip = state["step"], state["epoch"], state["batch_in_epoch"]

    def save(self, batch_in_epoch: int, name: str = CHECKPOINT_LAST) -> None:
        """The model, optimizer and place in the data as `name`, and as the last checkpoint."""
        if not self.main:
            return
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                   "epoch": self.epoch, "batch_in_epoch": batch_in_epoch, **self.extra_state()}
        self.last_checkpoint = save_checkpoint(self.folder / name, payload)
        if name != CHECKPOINT_LAST:
            save_checkpoint(self.folder / CHECKPOINT_LAST, payload)

    def _running(self) -> bool:
        return (self.epochs is None or self.epoch < self.epochs) and not self._at_max()

    def _at_max(self) -> bool:
        return bool(self.max_steps) and self.step >= self.max_steps

    def fit(self, batches: Callable[[int, int], Iterable], loss: LossFn, on_step: StepFn | None = None) -> None:
        """Train until the limits. `batches(epoch, skip)` yields the epoch's batches after its
        first `skip` (those a resumed run has already consumed)."""
        self.model.train()
        while self._running():
            consumed, micro, parts_sum = self.skip, 0, {}
            for batch in batches(self.epoch, self.skip):
                consumed += 1
                sync = (micro + 1) % self.accum_steps == 0
                out = loss(batch, sync)
                if out is None:
                    continue
                micro += 1
                value, parts = out
                (value / self.accum_steps).backward()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v.item() / self.accum_steps
                if not sync:
                    continue
                lr = self._optimizer_step()
                if on_step is not None:
                    on_step(self.step, self.epoch, lr, parts_sum)
                parts_sum = {}
                if self.save_every and self.step % self.save_every == 0:
                    self.save(consumed)
                if self._at_max():
                    break
            else:
                self.skip = 0
                self.epoch += 1
                self.save(0, f"checkpoint_{self.epoch - 1:02d}.pt" if self.epoch_checkpoints else CHECKPOINT_LAST)
                continue
            self.save(consumed)  # stopped mid-epoch
            break

    def _optimizer_step(self) -> float:
        lr = self.schedule(self.epoch, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return lr
