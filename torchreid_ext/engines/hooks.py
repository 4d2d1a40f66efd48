"""What a training run does besides training, as hooks of the run loop (FastReID's trainer pattern).

:meth:`~torchreid_ext.engines.base.ReIDEngine.run` trains epoch by epoch and calls each hook of
:meth:`~torchreid_ext.engines.base.ReIDEngine.build_hooks`, in order, at three moments:

* ``after_epoch(engine, epoch, last)``: after training epoch ``epoch`` (0-based);
* ``before_final_test(engine)`` and ``after_final_test(engine, rank1)`` around the final
  evaluation (after the last epoch, or when a resumed run had finished training).

The run's state they share lives on the engine: ``engine.rank1`` (the latest evaluation's rank-1)
and ``engine.evaluated`` (whether this epoch was evaluated). Override ``build_hooks`` to add,
remove or replace one; the metrics file is written by each evaluation (``ReIDEngine.test``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = ["EngineHook", "EvaluationHook", "CheckpointHook"]


class EngineHook:
    """A step of the run loop that is not training; override the moments it acts at."""

    def after_epoch(self, engine, epoch: int, last: bool) -> None:
        pass

    def before_final_test(self, engine) -> None:
        pass

    def after_final_test(self, engine, rank1: float) -> None:
        pass


class EvaluationHook(EngineHook):
    """Evaluate every ``eval_freq`` epochs from ``start_eval`` on (not the last epoch: the final
    evaluation follows it), and once at the end. ``test_kwargs``: ``ReIDEngine.test``'s arguments."""

    def __init__(self, eval_freq: int, start_eval: int, test_kwargs: Dict[str, Any]):
        self.eval_freq, self.start_eval, self.test_kwargs = eval_freq, start_eval, test_kwargs

    def due(self, epoch: int, last: bool) -> bool:
        done = epoch + 1
        return not last and self.eval_freq > 0 and done >= self.start_eval and done % self.eval_freq == 0

    def after_epoch(self, engine, epoch: int, last: bool) -> None:
        engine.evaluated = self.due(epoch, last)
        if engine.evaluated:
            engine.rank1 = engine.test(**self.test_kwargs)

    def final_test(self, engine) -> float:
        # a re-evaluation replaces the earlier record of this epoch
        engine.history = [e for e in engine.history if e.get("epoch") != engine.max_epoch]
        return engine.test(**self.test_kwargs)


class CheckpointHook(EngineHook):
    """Resumable checkpoints in ``<save_dir>/model``: every ``freq`` epochs (0: only evaluated
    epochs), rolling (the previous rolling one removed) unless the epoch was evaluated; the last
    epoch's is written before the final evaluation, so that its failure loses no training, and
    updated with its rank-1 after it (a resumed run that had finished training only evaluates)."""

    def __init__(self, freq: int, save_dir: str):
        self.freq, self.save_dir = freq, save_dir
        self._state: Optional[Dict[str, Any]] = None

    def after_epoch(self, engine, epoch: int, last: bool) -> None:
        periodic = self.freq > 0 and (epoch + 1) % self.freq == 0
        if engine.evaluated or (periodic and not last):
            engine.save_model(epoch, engine.rank1, self.save_dir, keep=engine.evaluated)

    def before_final_test(self, engine) -> None:
        self._state = engine.checkpoint_state(engine.epoch, engine.rank1) if engine.is_main_process else None
        if engine.start_epoch < engine.max_epoch:
            engine.save_model(engine.epoch, engine.rank1, self.save_dir, keep=True, state=self._state)

    def after_final_test(self, engine, rank1: float) -> None:
        if self._state is not None:  # the last checkpoint records its evaluation (Torchreid's rank1)
            self._state.update(rank1=float(rank1), history=engine.history)
            engine.save_model(engine.epoch, rank1, self.save_dir, keep=True, state=self._state, note="updated")
            self._state = None
