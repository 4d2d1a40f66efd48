"""engines/hooks.py: ReIDEngine.run calls its hooks at every moment, in order, with one RunState;
it runs with no hooks; the default hooks evaluate and checkpoint on the documented schedule."""
import json
import os
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from torchreid_ext.engines.base import ReIDEngine
from torchreid_ext.engines.hooks import EngineHook, RunState

MOMENTS = ["before_train", "before_epoch", "before_step", "after_step", "after_epoch", "before_final_test",
           "after_final_test", "after_train"]


class StepEngine(ReIDEngine):
    """A linear layer on 8 fixed vectors, 2 batches per epoch, no test sets; ``calls`` records its
    steps and evaluations among the hooks' calls."""

    fail_at = None  # (epoch, batch_idx) whose step raises

    def forward_backward(self, data):
        if (self.epoch, self.batch_idx) == self.fail_at:
            raise RuntimeError("the step failed")
        self.calls.append(("step", self.epoch, self.batch_idx))
        x, y = data
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.backward_and_step(loss)
        return {"loss": loss.item()}

    def test(self, **kwargs):
        self.calls.append(("test", self.epoch + 1))
        return super().test(**kwargs)


def step_engine(checkpoint_freq=1):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.arange(8) % 3)
    dm = SimpleNamespace(train_loader=torch.utils.data.DataLoader(data, batch_size=4), test_loader={}, sources=[])
    engine = StepEngine(dm, model, torch.optim.SGD(model.parameters(), lr=0.1), use_gpu=False,
                        checkpoint_freq=checkpoint_freq)
    engine.calls = []
    return engine


class Recorder(EngineHook):
    """A hook at every moment, writing (name, moment, epoch[, batch_idx]) to the engine's calls."""

    def __init__(self, name):
        self.name, self.states, self.summaries = name, set(), []

    def _record(self, moment, engine, state):
        self.states.add(id(state))
        step = (state.batch_idx,) if moment.endswith("_step") else ()
        engine.calls.append((self.name, moment, state.epoch) + step)
        if moment == "after_step":
            self.summaries.append((state.global_step, dict(state.loss_summary)))


for _moment in MOMENTS:
    setattr(Recorder, _moment, lambda self, engine, state, m=_moment: self._record(m, engine, state))


def with_hooks(engine, hooks):
    engine.build_hooks = lambda eval_freq, start_eval, test_kwargs: hooks
    return engine


def both(moment, *where):
    return [("A", moment) + where, ("B", moment) + where]


def test_run_calls_a_hook_at_every_moment_in_order(tmp_path):
    a, b = Recorder("A"), Recorder("B")
    engine = with_hooks(step_engine(), [a, b])
    engine.run(save_dir=str(tmp_path), max_epoch=2, eval_freq=1)
    epochs = []
    for epoch in range(2):
        steps = [call for i in range(2) for call in
                 both("before_step", epoch, i) + [("step", epoch, i)] + both("after_step", epoch, i)]
        epochs += both("before_epoch", epoch) + steps + both("after_epoch", epoch)
    assert engine.calls == (both("before_train", 0) + epochs + both("before_final_test", 1) + [("test", 2)]
                            + both("after_final_test", 1) + both("after_train", 1))
    # one RunState, the engine's, for every call; after_step sees the step's loss summary
    assert a.states == b.states == {id(engine.run_state)} and isinstance(engine.run_state, RunState)
    assert [s for s, _ in a.summaries] == [0, 1, 2, 3] and all(set(x) == {"loss"} for _, x in a.summaries)
    assert engine.run_state.losses.meters["loss"].val == a.summaries[-1][1]["loss"]


def test_run_needs_no_hooks(tmp_path):
    """No hooks: training and the final evaluation only (no periodic one, no checkpoint, no events)."""
    engine = with_hooks(step_engine(), [])
    before = engine.model.weight.detach().clone()
    assert engine.run(save_dir=str(tmp_path), max_epoch=2, eval_freq=1) == {}
    assert engine.calls == [("step", e, i) for e in range(2) for i in range(2)] + [("test", 2)]
    assert not torch.equal(before, engine.model.weight)
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
    assert [e["epoch"] for e in json.load(open(tmp_path / "metrics.json"))["evaluations"]] == [2]


def test_an_evaluation_only_run_has_the_outer_and_final_test_moments(tmp_path):
    engine = with_hooks(step_engine(), [Recorder("A")])
    engine.run(save_dir=str(tmp_path), max_epoch=2, start_epoch=2, test_only=True)
    assert engine.calls == [("A", "before_train", 2), ("A", "before_final_test", 2), ("test", 3),
                            ("A", "after_final_test", 2), ("A", "after_train", 2)]
    engine = step_engine()  # the default hooks: TensorBoard events, no checkpoint
    engine.run(save_dir=str(tmp_path / "default"), start_epoch=2, test_only=True)
    assert not osp.exists(tmp_path / "default" / "model")
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "default"))


def test_after_train_runs_when_the_run_fails(tmp_path):
    engine = with_hooks(step_engine(), [Recorder("A")])
    engine.fail_at = (1, 0)
    with pytest.raises(RuntimeError, match="the step failed"):
        engine.run(save_dir=str(tmp_path), max_epoch=2)
    assert engine.calls[-4:] == [("A", "after_epoch", 0), ("A", "before_epoch", 1), ("A", "before_step", 1, 0),
                                 ("A", "after_train", 1)]  # no after_step, after_epoch or final test


def test_a_hook_that_is_not_an_engine_hook_is_refused(tmp_path):
    engine = with_hooks(step_engine(), [object()])
    with pytest.raises(TypeError, match=r"build_hooks returned \['object'\], which are not EngineHook"):
        engine.run(save_dir=str(tmp_path), max_epoch=1)
    assert engine.calls == []


# ---------------------------------------------------------------- the default hooks' schedule

class ScheduleEngine(StepEngine):
    """Records evaluations (rank-1 0.1 x epoch) and checkpoint saves instead of making them."""

    def test(self, **kwargs):
        self.calls.append(("test", self.epoch + 1))
        self.history.append({"epoch": self.epoch + 1})
        return 0.1 * (self.epoch + 1)

    def save_model(self, epoch, rank1, save_dir, keep=True, state=None, note="saved to"):
        self.calls.append(("save", epoch + 1, keep, round(rank1, 3), note))


def schedule(tmp_path, checkpoint_freq, **run):
    engine = step_engine(checkpoint_freq)
    engine.__class__ = ScheduleEngine
    engine.run(save_dir=str(tmp_path), **run)
    return [c for c in engine.calls if c[0] != "step"]


def test_default_hooks_evaluate_and_checkpoint_on_the_documented_schedule(tmp_path):
    assert schedule(tmp_path, 1, max_epoch=5, eval_freq=2) == [
        ("save", 1, False, 0.0, "saved to"),  # rolling
        ("test", 2), ("save", 2, True, 0.2, "saved to"),  # an evaluated epoch is kept
        ("save", 3, False, 0.2, "saved to"),
        ("test", 4), ("save", 4, True, 0.4, "saved to"),
        ("save", 5, True, 0.4, "saved to"),  # the last epoch, before the final test
        ("test", 5), ("save", 5, True, 0.5, "updated"),  # then updated with its rank-1
    ]
    # checkpoint_freq 0: evaluated epochs and the last only; a resumed run that had finished
    # training (start = max) only evaluates and updates its checkpoint
    assert schedule(tmp_path, 0, max_epoch=3) == [("save", 3, True, 0.0, "saved to"), ("test", 3),
                                                  ("save", 3, True, 0.3, "updated")]
    assert schedule(tmp_path, 1, start_epoch=3, max_epoch=3, eval_freq=2) == [("test", 3),
                                                                            ("save", 3, True, 0.3, "updated")]
