"""The shared training loop on a toy regression: limits, accumulation, skipped batches,
checkpoints and exact resume, whatever command brings the batches and the loss."""

from __future__ import annotations

import pytest
import torch

from ramcli.errors import RamcliError
from ramcli_train.trainer import (
    CHECKPOINT_LAST,
    Trainer,
    load_checkpoint,
    progress_line,
)

DATA = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
TARGET = DATA @ torch.tensor([1.0, -2.0, 0.5])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def _batches(size: int):
    def batches(epoch: int, skip: int):
        order = torch.randperm(len(DATA), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [order[i:i + size] for i in range(0, len(order), size)][skip:]
    return batches


def _loss(model):
    def loss(batch, sync):
        if batch == []:
            return None
        err = (model(DATA[batch]).squeeze(1) - TARGET[batch]) ** 2
        return err.mean(), {"mse": err.mean()}
    return loss


def _trainer(model, folder, **kw) -> Trainer:
    folder.mkdir(exist_ok=True)
    kw = {"epochs": 3, "save_every": 2, "grad_clip": 1.0, **kw}
    return Trainer(model, folder, 0.1, 0.01, lambda epoch, step: 0.1 / (1 + step), **kw)


def test_limits_epoch_checkpoints_and_the_step_callback(tmp_path):
    model = _model()
    seen = []
    trainer = _trainer(model, tmp_path, max_steps=7, epoch_checkpoints=True)
    trainer.fit(_batches(4), _loss(model), lambda step, epoch, lr, parts: seen.append((step, epoch, lr)))
    assert trainer.step == 7 and trainer.epoch == 2  # 3 steps an epoch
    assert seen == [(s, (s - 1) // 3, 0.1 / s) for s in range(1, 8)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_00.pt", "checkpoint_01.pt", CHECKPOINT_LAST]
    last = load_checkpoint(tmp_path / CHECKPOINT_LAST)
    assert (last["step"], last["epoch"], last["batch_in_epoch"]) == (7, 2, 1)


def test_resume_mid_epoch_continues_exactly(tmp_path):
    straight = _model()
    _trainer(straight, tmp_path / "a").fit(_batches(4), _loss(straight))
    first = _model()
    _trainer(first, tmp_path / "b", max_steps=4, extra_state=lambda: {"note": "kept"}).fit(_batches(4), _loss(first))
    state = load_checkpoint(tmp_path / "b" / CHECKPOINT_LAST)
    assert state["note"] == "kept" and (state["epoch"], state["batch_in_epoch"]) == (1, 1)
    resumed = _model()
    trainer = _trainer(resumed, tmp_path / "b")
    trainer.restore(state)
    trainer.fit(_batches(4), _loss(resumed))
    assert trainer.step == 9
    assert all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_accumulated_micro_batches_step_as_one_batch(tmp_path):
    whole, parts = _model(), _model()
    _trainer(whole, tmp_path / "a", epochs=1).fit(_batches(4), _loss(whole))
    micro = _trainer(parts, tmp_path / "b", epochs=1, accum_steps=2)
    logged = []
    micro.fit(_batches(2), _loss(parts), lambda step, epoch, lr, p: logged.append(p["mse"]))
    assert micro.step == 3 and len(logged) == 3
    for a, b in zip(whole.parameters(), parts.parameters()):
        torch.testing.assert_close(a, b)


def test_a_batch_without_a_loss_takes_no_step(tmp_path):
    model = _model()

    def batches(epoch, skip):
        return [[], [0, 1, 2], [], [3, 4]][skip:]

    trainer = _trainer(model, tmp_path, epochs=1)
    trainer.fit(batches, _loss(model))
    assert trainer.step == 2
    assert load_checkpoint(tmp_path / CHECKPOINT_LAST)["batch_in_epoch"] == 0


def test_a_checkpoint_of_another_model_is_a_one_line_error(tmp_path):
    model = _model()
    trainer = _trainer(model, tmp_path / "a", max_steps=2)
    trainer.fit(_batches(4), _loss(model))
    state = load_checkpoint(tmp_path / "a" / CHECKPOINT_LAST)
    state["model"] = {f"old.{k}": v for k, v in state["model"].items()}  # names an earlier version used
    with pytest.raises(RamcliError, match="does not fit this model") as caught:
        _trainer(_model(), tmp_path / "b").restore(state)
    assert "\n" not in str(caught.value)


def test_one_progress_line_format_with_and_without_a_measured_speed():
    parts = {"tag": 0.8, "lm": 0.4}
    assert progress_line(40, 200, parts, 1e-4, 12.34) == "step 40/200 loss 1.2000 (tag 0.8000, lm 0.4000) lr 1.00e-04 12.3 img/s"
    assert progress_line(40, 200, parts, 1e-4) == "step 40/200 loss 1.2000 (tag 0.8000, lm 0.4000) lr 1.00e-04"
