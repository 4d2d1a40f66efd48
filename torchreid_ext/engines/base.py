"""ReIDEngine: Torchreid's ``Engine`` with what a long experiment needs.

Kept from Torchreid: ``run``'s and ``train``'s arguments and their loop (per-step console
line, fixbase epochs, LR schedule, final evaluation), ``engine.writer`` and the loss-summary
contract of ``forward_backward``. The loop calls hooks at FastReID's moments, and they share
one :class:`~torchreid_ext.engines.hooks.RunState` (:mod:`~torchreid_ext.engines.hooks`);
the default ones write TensorBoard events (``Train/*`` per step), evaluate and checkpoint.
Replaced:

* device: tensors go to ``self.device`` (never a hard-coded CUDA call);
* evaluation: the fast evaluator (``test.evaluator: fast``, chunked, adds mINP) or
  Torchreid's (``torchreid``), a progress bar on feature extraction, ``Test/<ds>/mINP``;
* checkpoints (:class:`~torchreid_ext.engines.hooks.CheckpointHook`): atomic, weights-only-safe,
  with RNG state, every ``checkpoint_freq`` epochs (older rolling ones pruned, also the one a
  resumed run started from; evaluation epochs and the last kept), so ``model.resume`` ends with
  the same weights as an uninterrupted run. The last epoch's is written before the final
  evaluation (an evaluation that fails loses no training: resuming it only evaluates) and
  updated with its rank-1; evaluation epochs: :class:`~torchreid_ext.engines.hooks.EvaluationHook`;
* ``metrics.json`` in the save dir: run info plus every evaluation's results
  (``metrics-test.json`` for evaluation-only runs);
* scale-out (``train.amp``, ``train.channels_last``, DDP): :meth:`autocast` around the
  forward (``bf16``, or ``fp16`` with a ``GradScaler``: :meth:`backward_and_step`), inputs in
  channels-last memory format, and under DistributedDataParallel: only rank 0 writes (log,
  TensorBoard, checkpoints, metrics) and evaluates (with the unwrapped model), the other
  ranks wait; each epoch starts with ``sampler.set_epoch(epoch)`` and the RNG streams reseeded
  from ``(seed, epoch, rank)`` (:func:`~torchreid_ext.checkpoint.seed_epoch`), which makes a
  resumed run exact on every rank without saving each rank's RNG state.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import os.path as osp
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .. import distributed
from ..adapter import torchreid
from ..checkpoint import (
    capture_rng_state,
    load_checkpoint,
    resume_from_checkpoint,
    save_checkpoint,
    seed_epoch,
)
from ..distributed import unwrap_model
from ..errors import ConfigError
from ..files import METRICS_FILE, TEST_METRICS_FILE, write_json_atomic
from ..log import show_output
from .hooks import CheckpointHook, EngineHook, EvaluationHook, RunState, TensorBoardHook
from .options import AMP_DTYPES, EngineOptions

__all__ = ["ReIDEngine", "AMP_DTYPES"]

logger = logging.getLogger(__name__)


def _to_channels_last(model: torch.nn.Module) -> None:
    """Convert ``model`` to channels-last; a DDP-wrapped model must already be (convert first:
    DDP's gradient buckets follow the parameters' layout at wrapping)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        bad = [n for n, p in model.module.named_parameters()
               if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last)]
        if bad:
            raise ValueError(f"channels_last = True, but the DDP-wrapped model's parameter '{bad[0]}' is "
                             "not channels-last; convert the model before wrapping it in DDP")
        return
    model.to(memory_format=torch.channels_last)


class ReIDEngine(torchreid().engine.Engine):
    """Base engine; subclasses implement ``forward_backward(data) -> dict``."""

    def __init__(
        self,
        datamanager,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler=None,
        use_gpu: bool = True,
        evaluator: str = "fast",
        checkpoint_freq: int = 1,
        run_info: Optional[Dict[str, Any]] = None,
        amp: str = "none",
        channels_last: bool = False,
        seed: Optional[int] = None,
        evaluation_options=None,
    ):
        super().__init__(datamanager, use_gpu)
        show_output()  # in a plain script, the lines Torchreid's engines print
        from ..metrics import EvaluationOptions

        # ConfigErrors naming the bad value and its config key
        EvaluationOptions.check_value("evaluator", evaluator, EvaluationOptions.key_of("evaluator"), ConfigError)
        for name, value in (("amp", amp), ("checkpoint_freq", int(checkpoint_freq))):
            EngineOptions.check_value(name, value, EngineOptions.key_of(name), ConfigError)
        self.device = torch.device("cuda" if self.use_gpu else "cpu")
        self.autocast_dtype: Optional[torch.dtype] = AMP_DTYPES[amp]
        # fp16 needs loss scaling (its range underflows small gradients); bf16 does not
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self.channels_last = bool(channels_last)
        if self.channels_last:
            _to_channels_last(model)
        self.seed = seed
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.register_model("model", model, optimizer, scheduler)
        self.evaluator = evaluator
        self.checkpoint_freq = int(checkpoint_freq)
        self.run_info: Dict[str, Any] = dict(run_info or {})
        self.history: List[Dict[str, Any]] = []
        self.last_results: Dict[str, Dict[str, Any]] = {}
        self.extra_state: Dict[str, Any] = {}  # objects with state_dict() saved in checkpoints
        self._train_seconds = 0.0
        self._train_images = 0
        self.metrics_file = METRICS_FILE
        self.hooks: List[EngineHook] = []  # the run's, from build_hooks
        self.run_state: Optional[RunState] = None  # the current (or last) run's, shared with its hooks
        if evaluation_options is not None:
            self.evaluation_options = evaluation_options

    # ------------------------------------------------------------------ helpers
    def to_device(self, *tensors: torch.Tensor):
        out = tuple(t.to(self.device, non_blocking=True) for t in tensors)
        return out if len(out) > 1 else out[0]

    @property
    def is_main_process(self) -> bool:
        return distributed.is_main_process()

    def autocast(self):
        """Autocast to ``autocast_dtype`` (a no-op without AMP); losses stay outside it."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_inputs(self, data):
        """(images, pids) of a training batch on the device, images channels-last if asked."""
        imgs, pids = self.to_device(*self.parse_data_for_train(data))
        if self.channels_last:
            imgs = imgs.contiguous(memory_format=torch.channels_last)
        return imgs, pids

    def loss_scale(self) -> Optional[torch.Tensor]:
        """The GradScaler's current scale as a tensor (fp16), else None."""
        if self.grad_scaler is None:
            return None
        return self.grad_scaler.scale(torch.ones((), device=self.device))

    def step_optimizer(self) -> None:
        """``optimizer.step()``; with fp16, GradScaler's unscale, inf check, step and update."""
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Zero the gradients, back-prop ``loss`` (scaled with fp16) and step."""
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.loss_scale()
        (loss if scale is None else loss * scale).backward()
        self.step_optimizer()

    # ------------------------------------------------------------------ training
    def train(self, print_freq: int = 10, fixbase_epoch: int = 0, open_layers=None) -> None:
        """One epoch, Torchreid's loop (fixbase epochs, a console line every ``print_freq`` steps, the
        LR step at the end) after :meth:`start_epoch_streams`, with the hooks' step moments around
        each ``forward_backward``; the meters and the loss summary go to :attr:`run_state`."""
        state = self.run_state if self.run_state is not None else RunState(
            max_epoch=getattr(self, "max_epoch", self.epoch + 1))
        state.epoch = self.epoch
        t0 = time.time()
        self.start_epoch_streams(self.epoch)
        self.set_model_mode("train")
        self.two_stepped_transfer_learning(self.epoch, fixbase_epoch, open_layers)
        self.num_batches = state.num_batches = len(self.train_loader)
        meters = torchreid().utils
        state.losses = meters.MetricMeter()
        state.batch_time, state.data_time = meters.AverageMeter(), meters.AverageMeter()
        end = time.time()
        for batch_idx, data in enumerate(self.train_loader):
            self.batch_idx = state.batch_idx = batch_idx  # Torchreid's field: forward_backward may read it
            state.data_time.update(time.time() - end)
            self.call_hooks("before_step")
            state.loss_summary = self.forward_backward(data)
            state.batch_time.update(time.time() - end)
            state.losses.update(state.loss_summary)
            if (batch_idx + 1) % print_freq == 0:
                logger.info(self.progress_line(state))
            self.call_hooks("after_step")
            end = time.time()
        self.update_lr()
        self._train_seconds += time.time() - t0
        self._train_images += self.num_batches * self.train_loader.batch_size * distributed.get_world_size()

    def progress_line(self, state: RunState) -> str:
        """Torchreid's console line for the current step: epoch and step, times, ETA, losses, LR."""
        steps_left = (state.max_epoch - state.epoch) * state.num_batches - (state.batch_idx + 1)
        eta = datetime.timedelta(seconds=int(state.batch_time.avg * steps_left))
        bt, dt = state.batch_time, state.data_time
        return (f"epoch: [{state.epoch + 1}/{state.max_epoch}][{state.batch_idx + 1}/{state.num_batches}]\t"
                f"time {bt.val:.3f} ({bt.avg:.3f})\tdata {dt.val:.3f} ({dt.avg:.3f})\teta {eta}\t"
                f"{state.losses}\tlr {self.get_current_lr():.6f}")

    def start_epoch_streams(self, epoch: int) -> None:
        """``set_epoch`` on the train sampler; reseed the RNGs from (seed, epoch, rank)."""
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if self.seed is not None:
            seed_epoch(self.seed, epoch, distributed.get_rank())

    def two_stepped_transfer_learning(self, epoch, fixbase_epoch, open_layers, model=None):
        """Torchreid's fixbase epochs, on the model inside a DDP wrapper."""
        model = unwrap_model(self.model if model is None else model)
        super().two_stepped_transfer_learning(epoch, fixbase_epoch, open_layers, model=model)

    def run(
        self,
        save_dir: str = "log",
        max_epoch: int = 0,
        start_epoch: int = 0,
        print_freq: int = 10,
        fixbase_epoch: int = 0,
        open_layers=None,
        start_eval: int = 0,
        eval_freq: int = -1,
        test_only: bool = False,
        dist_metric: str = "euclidean",
        normalize_feature: bool = False,
        visrank: bool = False,
        visrank_topk: int = 10,
        use_metric_cuhk03: bool = False,
        ranks: Sequence[int] = (1, 5, 10, 20),
        rerank: bool = False,
    ) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``max_epoch`` and evaluate (Torchreid's contract), calling
        the hooks of :meth:`build_hooks` at each moment (:mod:`~torchreid_ext.engines.hooks`);
        returns the last evaluation's results per target dataset."""
        if visrank and not test_only:
            raise ConfigError("visrank (test.visrank) can be True only with test_only (test.evaluate) True")
        if not test_only and start_epoch > max_epoch:
            raise ConfigError(f"start_epoch = {start_epoch} is past max_epoch = {max_epoch}: the run already "
                              f"finished at epoch {start_epoch}; evaluate it with test_only=True")
        self.save_dir = save_dir
        # an evaluation-only run must not overwrite the training run's record
        self.metrics_file = TEST_METRICS_FILE if test_only else METRICS_FILE
        test_kwargs = dict(
            dist_metric=dist_metric, normalize_feature=normalize_feature, visrank=visrank,
            visrank_topk=visrank_topk, save_dir=save_dir, use_metric_cuhk03=use_metric_cuhk03,
            ranks=list(ranks), rerank=rerank,
        )
        if not test_only:
            self.start_epoch, self.max_epoch = start_epoch, max_epoch
            self._rolling_checkpoint = self._resumed_rolling_checkpoint(save_dir)
        state = self.run_state = RunState(save_dir=save_dir, start_epoch=start_epoch, max_epoch=max_epoch,
                                          test_only=test_only, epoch=start_epoch)
        self.hooks = list(self.build_hooks(eval_freq, start_eval, test_kwargs))
        bad = [type(h).__name__ for h in self.hooks if not isinstance(h, EngineHook)]
        if bad:
            raise TypeError(f"build_hooks returned {bad}, which are not EngineHook instances")
        time_start = time.time()
        try:
            self.call_hooks("before_train")
            if test_only:
                self.epoch = start_epoch
                self.final_test(test_kwargs)
                return self.last_results
            logger.info("=> Start training")
            for epoch in range(start_epoch, max_epoch):
                self.epoch = state.epoch = epoch
                state.evaluated = False
                self.call_hooks("before_epoch")
                self.train(print_freq=print_freq, fixbase_epoch=fixbase_epoch, open_layers=open_layers)
                self.call_hooks("after_epoch")
            if max_epoch > 0:
                self.epoch = state.epoch = max_epoch - 1
                self.final_test(test_kwargs)
            logger.info("Elapsed %s", datetime.timedelta(seconds=round(time.time() - time_start)))
            return self.last_results
        finally:
            self.call_hooks("after_train")

    def final_test(self, test_kwargs: Dict[str, Any]) -> None:
        """The run's last evaluation (its results are ``run``'s), between the hooks' final-test moments."""
        state = self.run_state
        self.call_hooks("before_final_test")
        if not state.test_only:
            logger.info("=> Final test")
            # a re-evaluation replaces the earlier record of this epoch
            self.history = [e for e in self.history if e.get("epoch") != state.epoch + 1]
        state.rank1 = self.test(**test_kwargs)
        state.results = dict(self.last_results)
        self.call_hooks("after_final_test")

    def build_hooks(self, eval_freq: int, start_eval: int, test_kwargs: Dict[str, Any]) -> List[EngineHook]:
        """The run loop's hooks (:mod:`torchreid_ext.engines.hooks`), in the order they act: TensorBoard,
        evaluation, then checkpointing (an evaluated epoch's checkpoint is kept). Override to add,
        remove or replace one; ``run`` works with any list, an empty one included."""
        return [TensorBoardHook(), EvaluationHook(eval_freq, start_eval, test_kwargs),
                CheckpointHook(self.checkpoint_freq)]

    def call_hooks(self, moment: str) -> None:
        """Call ``moment`` (an :class:`~torchreid_ext.engines.hooks.EngineHook` method) of every hook of
        the run, in order, with this engine and :attr:`run_state`."""
        for hook in self.hooks:
            getattr(hook, moment)(self, self.run_state)

    def checkpoint_state(self, epoch: int, rank1: float) -> Dict[str, Any]:
        """Everything a resume needs after ``epoch`` (0-based), with ``max_epoch`` of the run."""
        model = unwrap_model(self.model)
        state = {
            "state_dict": model.state_dict(),
            "epoch": epoch + 1,
            "max_epoch": getattr(self, "max_epoch", None),
            "rank1": float(rank1),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": capture_rng_state(),
            "train_seconds": self._train_seconds,
            "train_images": self._train_images,
            "history": list(self.history),
        }
        for key, obj in self.extra_state.items():
            if obj is not None:
                state[key] = obj.state_dict()
        return state

    def save_model(self, epoch: int, rank1: float, save_dir: str, is_best: bool = False, keep: bool = True,
                   state: Optional[Dict[str, Any]] = None, note: str = "saved to") -> None:
        """Save ``<save_dir>/model/model.pth.tar-<epoch+1>`` atomically (Torchreid's name);
        ``state`` defaults to :meth:`checkpoint_state`.

        ``keep=False`` marks a rolling checkpoint: the previous rolling one is removed once
        the new file is in place (a failed save leaves it). Checkpoints of evaluation epochs
        and the last are kept.
        """
        if not self.is_main_process:
            return
        directory = osp.join(save_dir, "model")
        path = osp.join(directory, f"model.pth.tar-{epoch + 1}")
        save_checkpoint(self.checkpoint_state(epoch, rank1) if state is None else state, path)
        logger.info('Checkpoint %s "%s"', note, path)
        previous = getattr(self, "_rolling_checkpoint", None)
        if previous and previous != path and osp.exists(previous):
            os.remove(previous)
        self._rolling_checkpoint = None if keep else path

    def resume(self, path: str) -> int:
        """Restore everything a checkpoint holds (RNG last); return the epoch to start at."""
        ckpt = load_checkpoint(path)
        epoch = resume_from_checkpoint(
            ckpt, self.model, self.optimizer, self.scheduler, extra=self.extra_state, source=path
        )
        self._train_seconds = float(ckpt.get("train_seconds", 0.0))
        self._train_images = int(ckpt.get("train_images", 0))
        self.history = list(ckpt.get("history", []))
        # kept: a checkpoint whose epoch was evaluated or ended its run (one written before
        # "max_epoch" was recorded and ending its run was saved after its evaluation)
        kept = epoch == ckpt.get("max_epoch") or any(e.get("epoch") == epoch for e in self.history)
        self._resumed_from = None if kept else (path, epoch)
        return epoch

    def _resumed_rolling_checkpoint(self, save_dir: str) -> Optional[str]:
        """The rolling checkpoint :meth:`resume` read, if it is this run's own
        (``<save_dir>/model/model.pth.tar-<its epoch>``), so that the next one replaces it;
        a checkpoint of another save dir is never removed."""
        found, self._resumed_from = getattr(self, "_resumed_from", None), None
        if found is None:
            return None
        path, epoch = found
        own = osp.join(save_dir, "model", f"model.pth.tar-{epoch}")
        if osp.isfile(path) and osp.isfile(own) and osp.samefile(path, own):
            return own
        return None

    # ------------------------------------------------------------------ evaluation
    #: Test-time options beyond ``run``'s Torchreid arguments (re-ranking k1 / k2 / lambda, flip, AQE):
    #: an :class:`~torchreid_ext.metrics.EvaluationOptions`; the builder sets the run's (``test.*``).
    #: The Torchreid-named arguments of ``run`` / ``test`` (dist_metric, rerank, ...) override its fields.
    evaluation_options = None

    def test(self, save_dir: str = "", **options) -> float:
        """Evaluate on every target; log to TensorBoard and ``<save_dir>/metrics.json``; return rank-1.
        ``options``: Torchreid's ``test`` arguments (dist_metric, normalize_feature, visrank,
        visrank_topk, use_metric_cuhk03, ranks, rerank) or any other field of
        :class:`~torchreid_ext.metrics.EvaluationOptions` (e.g. ``rerank_k1=10``, ``flip=True``),
        over :attr:`evaluation_options`. Under DDP rank 0 evaluates; the others return 0."""
        from ..metrics import EvaluationOptions

        evaluation = (self.evaluation_options or EvaluationOptions()).for_call(
            evaluator=self.evaluator, progress=True, **options)
        if not self.is_main_process:
            return 0.0
        self.set_model_mode("eval")
        entry: Dict[str, Any] = {"epoch": self.epoch + 1, "results": {}}
        for name in self.test_loader:
            domain = "source" if name in self.datamanager.sources else "target"
            logger.info(f"##### Evaluating {name} ({domain}) #####")
            res = self._evaluate(
                dataset_name=name,
                query_loader=self.test_loader[name]["query"],
                gallery_loader=self.test_loader[name]["gallery"],
                ev=evaluation,
                save_dir=save_dir,
            )
            self.last_results[name] = res
            entry["results"][name] = res
            if self.writer is not None:
                for key in ("rank1", "mAP", "mINP"):
                    if res.get(key) is not None:
                        self.writer.add_scalar(f"Test/{name}/{key}", res[key], self.epoch)
        first = next(iter(entry["results"].values()), None)
        rank1 = first["rank1"] if first else 0.0
        self.history.append(entry)
        if save_dir:
            self.write_metrics(save_dir)
        return rank1

    def metrics_summary(self) -> Dict[str, Any]:
        seconds = self._train_seconds
        return {
            **self.run_info,
            "train_seconds": round(seconds, 2),
            "images_per_second": round(self._train_images / seconds, 2) if seconds > 0 else None,
            "evaluations": self.history,
        }

    def write_metrics(self, save_dir: str) -> None:
        write_json_atomic(self.metrics_summary(), osp.join(save_dir, self.metrics_file))

    def extract_features(self, input: torch.Tensor) -> torch.Tensor:
        """The embedding (eval mode), from the model inside a DDP wrapper: rank 0 evaluates
        alone, and a DDP forward would wait for the other ranks."""
        with self.autocast():
            return unwrap_model(self.model)(input)

    @torch.no_grad()
    def extract(self, loader, desc: str, flip: bool = False):
        """Features (float32, CPU), pids and camids of a loader, with a progress bar; ``flip``: averaged
        with the features of the mirrored images (``test.flip``; :func:`torchreid_ext.features.embed`)."""
        from ..features import extract_loader

        return extract_loader(self.extract_features, loader, self.device, flip=flip,
                              channels_last=self.channels_last, desc=desc)

    @torch.no_grad()
    def _evaluate(self, dataset_name: str, query_loader, gallery_loader, ev,
                  save_dir: str = "") -> Dict[str, Any]:
        """Extract, then :func:`torchreid_ext.metrics.evaluate_test_features` (the one evaluation from
        features, also behind ``scripts/evaluate.py``) with ``ev``, its
        :class:`~torchreid_ext.metrics.EvaluationOptions`."""
        from .. import metrics

        ranks = list(ev.ranks)
        t0 = time.time()
        qf, q_pids, q_camids = self.extract(query_loader, "query features", flip=ev.flip)
        gf, g_pids, g_camids = self.extract(gallery_loader, "gallery features", flip=ev.flip)
        logger.info(f"Extracted query {tuple(qf.shape)} and gallery {tuple(gf.shape)} features "
                    f"in {time.time() - t0:.1f} s" + (" (with flipped images)" if ev.flip else ""))
        t0 = time.time()
        if ev.aqe:
            logger.info(f"Alpha query expansion (k = {ev.aqe_k}, alpha = {ev.aqe_alpha}, rounds = {ev.aqe_rounds})")
        if ev.rerank:
            logger.info(f"Applying person re-ranking (k1 = {ev.rerank_k1}, k2 = {ev.rerank_k2}, "
                        f"lambda = {ev.rerank_lambda}) ...")
        qf_d, gf_d = (qf, gf) if ev.evaluator == "torchreid" else (qf.to(self.device), gf.to(self.device))
        out = metrics.evaluate_test_features(qf_d, gf_d, q_pids, g_pids, q_camids, g_camids, ev)
        res = metrics.results_dict(out, ranks)
        logger.info(f"Evaluated with the {ev.evaluator} evaluator in {time.time() - t0:.2f} s")
        for line in metrics.format_results(res, ranks).splitlines():
            logger.info(line)
        if ev.visrank:
            distmat = metrics.evaluation_distance_matrix(qf, gf, ev)
            torchreid().utils.visualize_ranked_results(
                distmat, self.datamanager.fetch_test_loaders(dataset_name), self.datamanager.data_type,
                width=self.datamanager.width, height=self.datamanager.height,
                save_dir=osp.join(save_dir, "visrank_" + dataset_name), topk=ev.visrank_topk,
            )
        return res
