"""What a training run does besides training, as hooks of the run loop (FastReID's trainer pattern).

:meth:`~torchreid_ext.engines.base.ReIDEngine.run` calls each hook of
:meth:`~torchreid_ext.engines.base.ReIDEngine.build_hooks`, in list order, as
``hook.<moment>(engine, state)`` at these moments::

    before_train                            once, first (an evaluation-only run too)
      before_epoch                          each epoch trained
        before_step, after_step             around each step (``forward_backward``)
      after_epoch
      before_final_test, after_final_test   around the final evaluation: after the last epoch,
                                            or alone when a resumed run had finished training
    after_train                             once, last, also when the run failed

``state`` is the run's :class:`RunState`, the one place hooks read what the run knows (epoch,
step, the loss summary, the latest evaluation) and record what they add (an evaluation's rank-1
and results). ``engine`` is what they act on (``engine.test``, ``engine.save_model``).
``run`` itself trains, runs the final evaluation (its results are ``run``'s return value, as in
Torchreid) and works with any list of hooks, an empty one included: that trains and evaluates
once, writing no checkpoint and no TensorBoard events. Override ``build_hooks`` to add, remove or
replace one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

__all__ = ["RunState", "EngineHook", "TensorBoardHook", "EvaluationHook", "CheckpointHook"]


@dataclass
class RunState:
    """The state of one ``run``, as its hooks see it. ``epoch`` and ``batch_idx`` are 0-based;
    at the final test ``epoch`` is the last epoch trained. The meters are Torchreid's
    (``MetricMeter``, ``AverageMeter``), reset each epoch."""

    save_dir: str = "log"
    start_epoch: int = 0
    max_epoch: int = 0
    test_only: bool = False
    epoch: int = 0
    num_batches: int = 0  # steps per epoch
    batch_idx: int = 0
    loss_summary: Dict[str, float] = field(default_factory=dict)  # the last step's forward_backward
    losses: Any = None  # MetricMeter: the epoch's running averages of the loss summaries
    batch_time: Any = None  # AverageMeter: seconds per step, data loading included
    data_time: Any = None  # AverageMeter: seconds per step spent loading data
    evaluated: bool = False  # the current epoch was evaluated
    rank1: float = 0.0  # the latest evaluation's rank-1 (0 before any)
    results: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # ... and results per target

    @property
    def last_epoch(self) -> bool:
        """Is ``epoch`` the run's last?"""
        return self.epoch + 1 == self.max_epoch

    @property
    def global_step(self) -> int:
        """The step's index in the run: ``epoch * num_batches + batch_idx``."""
        return self.epoch * self.num_batches + self.batch_idx


class EngineHook:
    """A part of the run that is not training; override the moments it acts at."""

    def before_train(self, engine, state: RunState) -> None:
        pass

    def before_epoch(self, engine, state: RunState) -> None:
        pass

    def before_step(self, engine, state: RunState) -> None:
        pass

    def after_step(self, engine, state: RunState) -> None:
        pass

    def after_epoch(self, engine, state: RunState) -> None:
        pass

    def before_final_test(self, engine, state: RunState) -> None:
        pass

    def after_final_test(self, engine, state: RunState) -> None:
        pass

    def after_train(self, engine, state: RunState) -> None:
        pass


class TensorBoardHook(EngineHook):
    """TensorBoard events in the save dir: opens Torchreid's ``engine.writer`` (rank 0; one the
    caller set is kept), writes the ``Train/*`` scalars of each step (Torchreid's: time, data,
    every loss-summary average, lr) and closes it. ``engine.test`` writes ``Test/*`` to it."""

    def before_train(self, engine, state: RunState) -> None:
        if engine.is_main_process and engine.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            engine.writer = SummaryWriter(log_dir=state.save_dir)

    def after_step(self, engine, state: RunState) -> None:
        writer = engine.writer
        if writer is None:
            return
        step = state.global_step
        writer.add_scalar("Train/time", state.batch_time.avg, step)
        writer.add_scalar("Train/data", state.data_time.avg, step)
        for name, meter in state.losses.meters.items():
            writer.add_scalar("Train/" + name, meter.avg, step)
        writer.add_scalar("Train/lr", engine.get_current_lr(), step)

    def after_train(self, engine, state: RunState) -> None:
        if engine.writer is not None:
            engine.writer.close()
            engine.writer = None


class EvaluationHook(EngineHook):
    """Evaluate every ``eval_freq`` epochs from ``start_eval`` on (not the last epoch: the final
    evaluation follows it), recording ``state.evaluated``, ``rank1`` and ``results``.
    ``test_kwargs``: ``ReIDEngine.test``'s arguments."""

    def __init__(self, eval_freq: int, start_eval: int, test_kwargs: Dict[str, Any]):
        self.eval_freq, self.start_eval, self.test_kwargs = eval_freq, start_eval, test_kwargs

    def due(self, epoch: int, last: bool) -> bool:
        done = epoch + 1
        return not last and self.eval_freq > 0 and done >= self.start_eval and done % self.eval_freq == 0

    def after_epoch(self, engine, state: RunState) -> None:
        if self.due(state.epoch, state.last_epoch):
            state.rank1 = engine.test(**self.test_kwargs)
            state.results = dict(engine.last_results)
            state.evaluated = True


class CheckpointHook(EngineHook):
    """Resumable checkpoints in ``<save_dir>/model``: every ``freq`` epochs (0: only evaluated
    epochs), rolling (the previous rolling one removed) unless the epoch was evaluated; the last
    epoch's is written before the final evaluation, so that its failure loses no training, and
    updated with its rank-1 after it (a resumed run that had finished training only evaluates).
    An evaluation-only run writes none."""

    def __init__(self, freq: int):
        self.freq = freq
        self._state: Optional[Dict[str, Any]] = None

    def after_epoch(self, engine, state: RunState) -> None:
        periodic = self.freq > 0 and (state.epoch + 1) % self.freq == 0
        if state.evaluated or (periodic and not state.last_epoch):
            engine.save_model(state.epoch, state.rank1, state.save_dir, keep=state.evaluated)

    def before_final_test(self, engine, state: RunState) -> None:
        if state.test_only or not engine.is_main_process:
            return
        self._state = engine.checkpoint_state(state.epoch, state.rank1)
        if state.start_epoch < state.max_epoch:
            engine.save_model(state.epoch, state.rank1, state.save_dir, keep=True, state=self._state)

    def after_final_test(self, engine, state: RunState) -> None:
        if self._state is not None:  # the last checkpoint records its evaluation (Torchreid's rank1)
            self._state.update(rank1=float(state.rank1), history=engine.history)
            engine.save_model(state.epoch, state.rank1, state.save_dir, keep=True, state=self._state,
                              note="updated")
            self._state = None
