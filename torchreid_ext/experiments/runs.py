"""Plan and launch the runs of a comparison: one ``scripts/main.py`` subprocess per config.

Each config runs with the same overrides, in its own save dir ``<out>/runs/<name>``, with
``model.resume auto`` (a killed comparison continues). With seeds, each config runs once per
seed (``train.seed``) in ``<out>/runs/<name>-seed<S>``; the runs of one config form a group.
A run is finished when its ``metrics.json`` holds an evaluation at ``train.max_epoch``.
A test-time run (:func:`test_time_runs`) evaluates another run's final checkpoint with other
``test.*`` options (re-ranking, flip, AQE ...) and trains nothing; it is finished when its
``metrics-test.json`` holds an evaluation.
``run.json`` in the save dir records the config and overrides, so a save dir can later be
passed alone, and a save dir made with other overrides is refused instead of being mixed
into the table.
"""
from __future__ import annotations

import hashlib
import json
import os
import os.path as osp
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..config import CN, ConfigError, load_config
from ..errors import HarnessError
from ..files import METRICS_FILE, TEST_METRICS_FILE, read_text
from ..options import is_int

__all__ = ["HarnessError", "Run", "plan_runs", "read_spec", "final_epoch", "is_finished", "launch",
           "load_metrics", "check_seeds", "test_time_options", "test_time_runs", "PROTOCOL_KEYS"]

SPEC_FILE = "run.json"
# Settings that must be equal across the runs of one comparison (same evaluation harness).
PROTOCOL_KEYS = ("data.root", "train.seed", "test.evaluator", "test.dist_metric",
                 "test.normalize_feature", "test.rerank", "data.height", "data.width")
# Keys the harness sets per run; overriding them for all runs would make runs collide.
RESERVED_KEYS = ("data.save_dir", "model.resume", "test.evaluate")
SEED_KEY = "train.seed"  # set per run by the harness when seeds are given


@dataclass
class Run:
    name: str  # unique within a comparison; the save dir's name
    save_dir: str
    config: str = ""  # config file ('' for a save dir given without one)
    overrides: List[str] = field(default_factory=list)
    cfg: Optional[CN] = None  # config with overrides, save dir and resume applied
    group: str = ""  # the runs of one config over seeds share it ('' -> name)
    seed: Optional[int] = None  # train.seed the harness set for this run (None: the config's)
    test_time: str = ""  # test-time config: this run only evaluates another run's final checkpoint

    def __post_init__(self) -> None:
        self.group = self.group or self.name

    @property
    def max_epoch(self) -> Optional[int]:
        return int(self.cfg.train.max_epoch) if self.cfg is not None and not self.test_time else None

    @property
    def metrics_file(self) -> str:
        return TEST_METRICS_FILE if self.test_time else METRICS_FILE


def _get(cfg: CN, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def run_name(config: str) -> str:
    """Save-dir name for a config: its path below ``configs/`` (or the cwd), '/' -> '__'."""
    path = osp.abspath(config)
    rel = osp.splitext(osp.relpath(path))[0]
    if rel.startswith(".."):
        stem = osp.splitext(osp.basename(path))[0]
        rel = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    if rel.startswith("configs" + os.sep):
        rel = rel[len("configs") + 1:]
    return rel.replace(os.sep, "__")


def _check_overrides(overrides: Sequence[str], seeded: bool = False) -> List[str]:
    overrides = [str(x) for x in overrides]
    if len(overrides) % 2:
        raise HarnessError(f"overrides must be KEY VALUE pairs; got an odd number of items: {overrides}")
    for key in overrides[0::2]:
        if key in RESERVED_KEYS:
            raise HarnessError(f"override '{key}' is set per run by the harness; remove it "
                               f"(reserved: {list(RESERVED_KEYS)}; choose the output folder with --out)")
        if seeded and key == SEED_KEY:
            raise HarnessError(f"override '{SEED_KEY}' conflicts with --seeds, which sets it per run; "
                               "remove one of them")
    return overrides


def check_seeds(seeds: Optional[Sequence[int]]) -> Optional[List[int]]:
    """None (each config's own ``train.seed``) or a non-empty list of distinct integer seeds."""
    if seeds is None:
        return None
    seeds = list(seeds)
    if not seeds:
        raise HarnessError("--seeds needs at least one integer seed, e.g. --seeds 1 2 3")
    bad = [s for s in seeds if not is_int(s) or not 0 <= s < 2 ** 32]
    if bad:
        raise HarnessError(f"--seeds {' '.join(map(str, bad))}: a seed is an integer in [0, 2**32 - 1]")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise HarnessError(f"seeds {repeated} are given more than once in --seeds {seeds}")
    return seeds


def _config_run(config: str, save_dir: str, overrides: List[str], name: str, group: str = "",
                seed: Optional[int] = None) -> Run:
    run_opts = overrides + ["data.save_dir", save_dir, "model.resume", "auto"]
    try:
        cfg = load_config(config, run_opts)
    except ConfigError as exc:
        raise HarnessError(f"{config}: {exc}") from exc
    return Run(name=name, save_dir=save_dir, config=config, overrides=overrides, cfg=cfg, group=group,
               seed=seed)


def _seeded_run_name(name: str, seed: int) -> str:
    return f"{name}-seed{seed}"


def _read_json_in(save_dir: str, name: str) -> Optional[Dict[str, Any]]:
    path = osp.join(save_dir, name)
    if not osp.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_spec(save_dir: str) -> Optional[Dict[str, Any]]:
    """The run.json of a save dir made by the harness (config and overrides), or None."""
    return _read_json_in(save_dir, SPEC_FILE)


def _save_dir_run(path: str) -> Run:
    spec, metrics_path = read_spec(path), osp.join(path, METRICS_FILE)
    if spec is not None:
        if not osp.isfile(spec["config"]):
            raise HarnessError(f"save dir '{path}' was made from config '{spec['config']}', which no longer exists")
        return _config_run(spec["config"], path, list(spec["overrides"]), osp.basename(osp.normpath(path)))
    if not osp.isfile(metrics_path):
        raise HarnessError(
            f"save dir '{path}' has no {METRICS_FILE} (not a finished run) and no {SPEC_FILE}; "
            "pass the config file that made it instead")
    return Run(name=osp.basename(osp.normpath(path)), save_dir=path)


def _check_spec(run: Run) -> None:
    """Refuse a save dir that already holds a run of another config or other overrides."""
    spec = read_spec(run.save_dir)
    if spec is None:
        return
    if osp.abspath(spec["config"]) != osp.abspath(run.config) or list(spec["overrides"]) != run.overrides:
        raise HarnessError(
            f"save dir '{run.save_dir}' holds a run of config '{spec['config']}' with overrides "
            f"{spec['overrides']}; this comparison asks for '{run.config}' with {run.overrides}. "
            "Choose another --out folder")


def _check_protocol(runs: Sequence[Run]) -> None:
    """One protocol for all runs; the seed only within runs of the same harness seed; test-time
    runs differ in ``test.*`` by design."""
    configured = [r for r in runs if r.cfg is not None]
    for key in PROTOCOL_KEYS:
        slots = {}
        for r in configured:
            if r.test_time and key.startswith("test."):
                continue
            slots.setdefault(r.seed if key == SEED_KEY else None, []).append(r)
        for slot in slots.values():
            values = {r.name: _get(r.cfg, key) for r in slot}
            if len({json.dumps(v if not isinstance(v, tuple) else list(v)) for v in values.values()}) > 1:
                raise HarnessError(
                    f"runs differ in {key} ({values}); a comparison needs one evaluation protocol: "
                    f"add `{key} <value>` to the overrides")


def _check_data(run: Run) -> None:
    from ..data.checks import check_dataset_present

    sources = list(run.cfg.data.sources)
    for name in dict.fromkeys(sources + list(run.cfg.data.targets)):
        try:
            check_dataset_present(name, run.cfg.data.root, key="data.sources" if name in sources else "data.targets")
        except (KeyError, FileNotFoundError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            raise HarnessError(f"{run.config}: {msg}") from exc


def _input_runs(path: str, out_dir: str, overrides: List[str], seeds: Optional[List[int]]) -> List[Run]:
    """The runs of one input: one per seed for a config (one if no seeds), one for a save dir."""
    if osp.isdir(path):
        if seeds is not None:
            raise HarnessError(
                f"input '{path}' is a save dir (one run of one seed); with --seeds give config files, "
                "and finished runs in --out are reused")
        return [_save_dir_run(path)]
    if osp.isfile(path) and path.endswith((".yaml", ".yml")):
        name = run_name(path)
        if seeds is None:
            runs = [_config_run(path, osp.join(out_dir, "runs", name), overrides, name)]
        else:
            runs = [_config_run(path, osp.join(out_dir, "runs", _seeded_run_name(name, s)),
                                overrides + [SEED_KEY, str(s)], _seeded_run_name(name, s), name, s)
                    for s in seeds]
        for run in runs:
            _check_spec(run)
        return runs
    if osp.exists(path):
        raise HarnessError(f"input '{path}' is neither a config file (.yaml/.yml) nor a save dir")
    raise HarnessError(f"input '{path}' does not exist (expected a config file or a save dir)")


def plan_runs(inputs: Sequence[str], out_dir: str, overrides: Sequence[str] = (),
              seeds: Optional[Sequence[int]] = None, test_time: Sequence[str] = (),
              test_time_of: Optional[str] = None) -> List[Run]:
    """Check every input (config file or save dir) and return the runs, before any training.

    ``seeds``: run every config once per seed (``train.seed``); None: once, with its own seed.
    ``test_time``: test-time configs evaluated on the final checkpoints of input
    ``test_time_of``'s runs (:func:`test_time_runs`), after them.
    """
    if not inputs:
        raise HarnessError("no input: give config files (.yaml) or save dirs holding metrics.json")
    seeds = check_seeds(seeds)
    overrides = _check_overrides(overrides, seeded=seeds is not None)
    runs: List[Run] = []
    for path in inputs:
        for run in _input_runs(path, out_dir, overrides, seeds):
            if any(r.save_dir == run.save_dir for r in runs):
                raise HarnessError(f"input '{path}' is given twice (save dir '{run.save_dir}')")
            runs.append(run)
    if test_time:
        if test_time_of is None:
            raise HarnessError("--test-time evaluates the baseline's trained models: give --baseline too")
        of = [r for r in runs if osp.abspath(r.config or r.save_dir) == osp.abspath(test_time_of)]
        runs += test_time_runs(of, test_time, out_dir)
    _check_protocol(runs)
    for run in runs:
        if run.cfg is not None and not is_finished(run):
            _check_data(run)
    return runs


def test_time_options(path: str) -> List[str]:
    """``KEY VALUE`` overrides of test-time config ``path``: a YAML mapping with a ``test`` section
    only (the options of evaluation: test.rerank, test.flip, test.aqe ...)."""
    if not osp.isfile(path):
        raise HarnessError(f"--test-time '{path}' does not exist (expected a YAML file with a test: section)")
    text = read_text(path, "--test-time", HarnessError)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise HarnessError(f"--test-time '{path}' is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict) or set(data) != {"test"} or not isinstance(data["test"], dict) or not data["test"]:
        raise HarnessError(f"--test-time '{path}' must hold only a test: section of evaluation options "
                           f"(e.g. test: {{rerank: True}}); "
                           f"got keys {sorted(data) if isinstance(data, dict) else data}")
    return [x for key, value in data["test"].items()
            for x in (f"test.{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n..."))]


def test_time_runs(trained: Sequence[Run], paths: Sequence[str], out_dir: str) -> List[Run]:
    """For every run in ``trained`` and test-time config in ``paths``: a run that evaluates the
    trained run's final checkpoint with the config's ``test.*`` options (same seed, same group
    name plus ``+<config stem>``), so that it pairs with the trained run seed by seed."""
    runs = []
    for path in paths:
        opts, stem = test_time_options(path), osp.splitext(osp.basename(path))[0]
        for base in trained:
            if base.cfg is None:
                raise HarnessError(f"--test-time needs the trained runs' configs; '{base.save_dir}' has none")
            group = f"{base.group}+{stem}"
            name = group if base.seed is None else _seeded_run_name(group, base.seed)
            checkpoint = osp.join(base.save_dir, "model", f"model.pth.tar-{base.cfg.train.max_epoch}")
            overrides = base.overrides + opts + ["test.evaluate", "True", "model.load_weights", checkpoint]
            run = _config_run(base.config, osp.join(out_dir, "runs", name), overrides, name, group, base.seed)
            run.test_time = path
            _check_spec(run)
            runs.append(run)
    return runs


def load_metrics(run: Run) -> Optional[Dict[str, Any]]:
    return _read_json_in(run.save_dir, run.metrics_file)


def final_epoch(run: Run, metrics: Dict[str, Any]) -> Optional[int]:
    """The epoch a finished run evaluates last: the config's ``train.max_epoch``, else the one
    metrics.json records (a save dir given without its config), else None (unknown; also for a
    test-time run, which evaluates once)."""
    if run.test_time:
        return None
    if run.max_epoch is not None:
        return run.max_epoch
    recorded = metrics.get("max_epoch")
    return int(recorded) if recorded is not None else None


def is_finished(run: Run) -> bool:
    """True when metrics.json holds an evaluation at the final epoch (any evaluation if unknown)."""
    metrics = load_metrics(run)
    if metrics is None or not metrics.get("evaluations"):
        return False
    epoch = final_epoch(run, metrics)
    return epoch is None or any(e["epoch"] == epoch for e in metrics["evaluations"])


def main_script() -> str:
    """Path of ``scripts/main.py`` next to the package (editable install / checkout)."""
    path = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "scripts", "main.py")
    if not osp.isfile(path):
        raise HarnessError(f"scripts/main.py not found at '{path}'; run from a checkout of torchreid-ext")
    return path


def launch(run: Run, python: str = sys.executable) -> None:
    """Train and evaluate ``run`` in a subprocess (output passes through); raise if it fails."""
    if run.cfg is None:
        raise HarnessError(f"save dir '{run.save_dir}' is not finished and has no config to run it with")
    os.makedirs(run.save_dir, exist_ok=True)
    with open(osp.join(run.save_dir, SPEC_FILE), "w") as f:
        json.dump({"config": osp.abspath(run.config), "overrides": run.overrides}, f, indent=2)
    cmd = [python, main_script(), "--config", run.config, *run.overrides,
           "data.save_dir", run.save_dir, "model.resume", "auto"]
    sys.stdout.flush()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise HarnessError(f"run '{run.name}' failed (exit status {proc.returncode}); its log is in '{run.save_dir}'")
    if not is_finished(run):
        what = "an evaluation" if run.test_time else f"an evaluation at epoch {run.max_epoch}"
        raise HarnessError(f"run '{run.name}' exited without {what}")
