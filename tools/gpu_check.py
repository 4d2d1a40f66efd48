#!/usr/bin/env python
"""The GPU check: every CUDA test and benchmark in one command, logs and figures in one folder.

    python tools/gpu_check.py [OUT_DIR] [--tar FILE] [--budget-s S] [--only STEP ...]

OUT_DIR: the argument, else ``$OUT``, else ``log/gpu_check``. Steps (each in its own process,
with its own timeout; a step that hangs is killed with its children):

1. ``env``: python, torch, CUDA, GPU, driver (``nvidia-smi``);
2. ``pytest_cuda``: ``pytest -m cuda -rs tests/cuda`` (junit XML kept);
3. ``throughput``: benchmarks/throughput.py (GPU defaults: resnet50_bnfc512, 256x128, batch 64);
4. ``msgr``: benchmarks/msgr.py (GPU defaults: B = 64 at 256x128);
5. ``evaluation``: benchmarks/evaluation.py ``--device cuda`` at the Market and MSMT17 shapes;
6. ``losses``: benchmarks/losses.py ``--device cuda``;
7. ``rerank``: benchmarks/rerank.py ``--device cuda --methods ours-features`` (re-ranking from the
   features on the device) at the Market and MSMT17 shapes; the device-vs-CPU agreement is
   tests/cuda's;
7b. ``msfl_cost``: benchmarks/msfl_cost.py ``--device cuda`` (MSFL vs its base: parameters, MACs,
   inference latency at batch 1 / 64, one training step);
8. ``train``: scripts/main.py, 2 epochs of bf16 + channels-last training on SynthReID, then
   its evaluation (checkpoints are left out of OUT_DIR);
9. ``pytest_other``: the suite's other CUDA-only tests (``-k 'gpu or cuda'`` in three files).

The steps run in that order within ``--budget-s`` (GPU: 480 s): each step's timeout is cut to
what is left, and steps past the budget are reported as not run. ``summary.md`` lists each
step's status, time and key numbers, with the issue's goals; the exit status is 1 if any step
failed, timed out or did not run. Without CUDA everything runs on the CPU with CPU-sized
settings (tiny shapes, few steps; the CUDA tests skip) and the summary's first line says so.

Nothing is fetched from the network. On a machine without Torchreid (e.g. a lent GPU machine
with only PyTorch), ``--fetch-wheels`` run beforehand where the package registry is reachable
puts the pure-Python wheels the project needs into ``.whl/`` (git-ignored); the check then
installs them into a temporary folder (``--no-index --no-deps``) and puts it and the
repository on ``PYTHONPATH`` of every step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import os.path as osp
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
PY = sys.executable
WHEELS = osp.join(REPO, ".whl")
# pure-Python packages the project imports that a bare PyTorch image may lack (torchreid 0.2.5 is
# an sdist on the registry: --fetch-wheels builds its wheel); versions: those installed here
WHEEL_PACKAGES = ["torchreid", "yacs", "gdown", "beautifulsoup4", "soupsieve", "PySocks"]
PROBE = "import torchreid, yacs, gdown, torchreid_ext"


# ------------------------------------------------------------------------------------------------
# steps


@dataclass
class Step:
    name: str
    what: str
    argv: List[str]
    timeout: int
    keys: Callable[["Step", str], str] = lambda step, log: ""
    outputs: List[str] = field(default_factory=list)  # files the step writes into OUT_DIR
    status: str = "not run"
    seconds: float = 0.0
    summary: str = ""


def _script(*parts: str) -> str:
    return osp.join(REPO, *parts)


def _last(pattern: str, text: str, flags: int = 0) -> Optional[re.Match]:
    found = list(re.finditer(pattern, text, flags))
    return found[-1] if found else None


def env_keys(step: Step, log: str) -> str:
    lines = [ln for ln in log.splitlines() if ln.startswith(("python ", "torch ", "cuda:", "CUDA: "))]
    driver = _last(r"Driver Version: (\S+)", log)
    return "; ".join(lines) + (f"; driver {driver.group(1)}" if driver else "")


def pytest_keys(step: Step, log: str) -> str:
    """Counts, failures and skip reasons from the step's JUnit XML (pytest --junitxml)."""
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(step.outputs[0]).getroot()
    except (OSError, ET.ParseError, IndexError):
        return "no pytest report"
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    counts = f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped"
    failed, skips = [], set()
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        skipped = case.find("skipped")
        if skipped is not None:
            skips.add((skipped.get("message") or "").strip())
    skips = sorted(skips)
    out = counts
    if failed:
        out += "; failed: " + ", ".join(failed[:8]) + (" ..." if len(failed) > 8 else "")
    if skips:
        out += "; skip reasons: " + " / ".join(s[:90] for s in skips[:3])
    return out


def throughput_keys(step: Step, log: str) -> str:
    data = _read_json(step.outputs[0])
    if not data:
        return ""
    return "; ".join(f"{v}: {ips:.1f} img/s ({data['vs_torchreid'][v]:.2f}x)"
                     for v, ips in data["images_per_second"].items())


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def msgr_keys(step: Step, log: str) -> str:
    data = _read_json(step.outputs[0])
    if not data:
        return ""
    parts = []
    for name, r in data["results"].items():
        med = r["median_s"]
        ratios = ", ".join(f"{m} {med[m] / med['plain']:.2f}x" for m in med if m != "plain")
        parts.append(f"{name}: plain {med['plain']:.3f} s, {ratios} (median)")
    return "; ".join(parts)


def evaluation_keys(step: Step, log: str) -> str:
    rows = _read_json(step.outputs[0])
    if not rows:
        return ""
    return "; ".join(f"{r['shape']} {r['method']}: {r['eval_s']:.4f} s (mAP {r['result']['mAP']:.4f})" for r in rows)


def losses_keys(step: Step, log: str) -> str:
    data = _read_json(step.outputs[0])
    if not data:
        return ""
    return "; ".join(f"{r['loss']} B = {r['batch']}: {r['vs_triplet_median']:.2f}x triplet, "
                     f"{r['peak_bytes'] / 2 ** 20:.0f} MB" for r in data["rows"] if r["loss"] != "triplet")


def rerank_keys(step: Step, log: str) -> str:
    rows = _read_json(step.outputs[0])
    if not rows:
        return ""
    return "; ".join(f"{r['shape']} on {r.get('device', 'cpu')}: {r['seconds']:.2f} s (plain "
                     f"{r['plain_seconds']:.2f} s, mAP {r['metrics']['mAP']:.4f})"
                     for r in rows if "error" not in r and not r.get("estimated"))


def msfl_cost_keys(step: Step, log: str) -> str:
    data = _read_json(step.outputs[0])
    if not data:
        return ""
    return "; ".join(f"{pair}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if k.startswith(("macs", "infer")))
                     for pair, r in data.get("ratios", {}).items())


def train_keys(step: Step, log: str) -> str:
    data = _read_json(step.outputs[0])
    if not data:
        return ""
    last = data["evaluations"][-1]["results"] if data.get("evaluations") else {}
    res = ", ".join(f"{ds}: rank-1 {r['rank1']:.3f}, mAP {r['mAP']:.3f}" for ds, r in last.items())
    return f"{res}; {data.get('images_per_second')} img/s over {data.get('train_seconds')} s of training"


def build_steps(out: str, gpu: bool, data_root: str, train_dir: str) -> List[Step]:
    j = lambda name: osp.join(out, name)  # noqa: E731
    steps = [Step("env", "environment", [PY, osp.abspath(__file__), "--env"], 60, env_keys)]
    steps.append(Step("pytest_cuda", "pytest -m cuda", [
        PY, "-m", "pytest", "-m", "cuda", "-rs", "-q", "-p", "no:cacheprovider", "--junitxml", j("pytest_cuda.xml"),
        "tests/cuda"], 300, pytest_keys, [j("pytest_cuda.xml")]))
    if gpu:
        bench = [
            ("throughput", "benchmarks/throughput.py (GPU defaults)", [
                _script("benchmarks", "throughput.py"), "--device", "cuda", "--json", j("throughput.json")],
             180, throughput_keys, [j("throughput.json")]),
            ("msgr", "benchmarks/msgr.py (GPU defaults, 3 repeats)", [
                _script("benchmarks", "msgr.py"), "--device", "cuda", "--repeats", "3", "--json", j("msgr.json")],
             300, msgr_keys, [j("msgr.json")]),
            ("evaluation", "benchmarks/evaluation.py --device cuda", [
                _script("benchmarks", "evaluation.py"), "--device", "cuda", "--shapes", "market", "msmt17",
                "--methods", "ours-matrix", "ours-features", "--json", j("evaluation.json")],
             240, evaluation_keys, [j("evaluation.json")]),
            ("losses", "benchmarks/losses.py --device cuda", [
                _script("benchmarks", "losses.py"), "--device", "cuda", "--json", j("losses.json")],
             180, losses_keys, [j("losses.json")]),
            ("rerank", "benchmarks/rerank.py: re-ranking, features path on CUDA", [
                _script("benchmarks", "rerank.py"), "--device", "cuda", "--methods", "ours-features",
                "--shapes", "market", "msmt17", "--json", j("rerank.json")], 240, rerank_keys, [j("rerank.json")]),
            ("msfl_cost", "benchmarks/msfl_cost.py --device cuda: MSFL vs its base, test time and a training step", [
                _script("benchmarks", "msfl_cost.py"), "--device", "cuda", "--repeats", "10", "--warmup", "3",
                "--json", j("msfl_cost.json")], 120, msfl_cost_keys, [j("msfl_cost.json")]),
        ]
        train = ["model.name", "resnet50_bnfc512", "data.height", "256", "data.width", "128",
                 "train.batch_size", "64", "data.workers", "4", "test.batch_size", "256"]
    else:
        bench = [
            ("throughput", "benchmarks/throughput.py (CPU-sized: osnet_x0_25, 64x32, batch 4)", [
                _script("benchmarks", "throughput.py"), "--device", "cpu", "--model", "osnet_x0_25", "--batch", "4",
                "--steps", "1", "--rounds", "1", "--warmup", "1", "--json", j("throughput.json")],
             300, throughput_keys, [j("throughput.json")]),
            ("msgr", "benchmarks/msgr.py (CPU-sized: resnet50_bnfc512, B = 2 at 32x16, no lazy cycles)", [
                _script("benchmarks", "msgr.py"), "--device", "cpu", "--models", "resnet50_bnfc512", "--batch", "2",
                "--size", "32", "16", "--repeats", "1", "--intervals", "--no-memory",
                "--json", j("msgr.json")], 300, msgr_keys, [j("msgr.json")]),
            ("evaluation", "benchmarks/evaluation.py (CPU-sized: tiny shape)", [
                _script("benchmarks", "evaluation.py"), "--device", "cpu", "--shapes", "tiny",
                "--methods", "ours-matrix", "ours-features", "--repeats", "1", "--json", j("evaluation.json")],
             400, evaluation_keys, [j("evaluation.json")]),
            ("losses", "benchmarks/losses.py (CPU-sized: B = 64)", [
                _script("benchmarks", "losses.py"), "--device", "cpu", "--batch-sizes", "64", "--repeats", "3",
                "--warmup", "1", "--budget-s", "1", "--json", j("losses.json")], 400, losses_keys, [j("losses.json")]),
            ("rerank", "benchmarks/rerank.py: re-ranking, features path (CPU-sized: tiny shape)", [
                _script("benchmarks", "rerank.py"), "--device", "cpu", "--methods", "ours-features",
                "--shapes", "tiny", "--repeats", "1", "--json", j("rerank.json")], 400, rerank_keys,
             [j("rerank.json")]),
            ("msfl_cost", "benchmarks/msfl_cost.py (CPU-sized: 64x32, batch 1 and 2)", [
                _script("benchmarks", "msfl_cost.py"), "--device", "cpu", "--sizes", "64x32", "--batches", "1", "2",
                "--train-batch", "2", "--repeats", "1", "--warmup", "0", "--json", j("msfl_cost.json")],
             300, msfl_cost_keys, [j("msfl_cost.json")]),
        ]
        # synthreid_small: bf16 autocast is several times slower than float32 on most CPUs
        train = ["data.sources", "[synthreid_small]", "data.targets", "[synthreid_small]", "train.batch_size", "16",
                 "data.workers", "0"]
    for name, what, argv, timeout, keys, outputs in bench:
        steps.append(Step(name, what, [PY, *argv], timeout, keys, outputs))
    data = ("SynthReID, resnet50_bnfc512 at 256x128, batch 64" if gpu
            else "synthreid_small, osnet_x0_25 at 64x32 (CPU-sized)")
    steps.append(Step("train", f"scripts/main.py: 2 epochs bf16 + channels-last on {data}, then evaluation", [
        PY, _script("scripts", "main.py"), "--config", _script("configs", "synthreid", "ce.yaml"),
        "data.root", data_root, "data.save_dir", train_dir, "train.max_epoch", "2", "train.amp", "bf16",
        "train.channels_last", "True", "train.stepsize", "[10]", "test.eval_freq", "-1",
        *train], 420 if not gpu else 300, train_keys, [j(osp.join("train", "metrics.json"))]))
    if gpu:
        steps.append(Step("pytest_other", "the suite's other CUDA-only tests", [
            PY, "-m", "pytest", "-rs", "-q", "-p", "no:cacheprovider", "-k", "gpu or cuda",
            "--junitxml", j("pytest_other.xml"),
            "tests/metrics/test_rank.py", "tests/metrics/test_rerank.py", "tests/engines/test_amp.py"],
            180, pytest_keys, [j("pytest_other.xml")]))
    return steps


# ------------------------------------------------------------------------------------------------
# running


def run_step(step: Step, out: str, env: Dict[str, str], timeout: float) -> None:
    log = osp.join(out, f"{step.name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            step.status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started
            proc.wait()
            step.status = f"TIMEOUT ({timeout:.0f} s)"
    step.seconds = time.time() - t0
    with open(log, errors="replace") as f:
        text = f.read()
    try:
        step.summary = step.keys(step, text)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        step.summary = f"(key numbers not read: {type(exc).__name__}: {exc})"


_PROBE = (PROBE + "; import torch; ok = torch.cuda.is_available(); "
          "print(int(ok), torch.__version__, torch.version.cuda, torch.cuda.get_device_name() if ok else '-', "
          "torch.cuda.device_count() if ok else 0, sep='|')")


def _probe(env: Dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", _PROBE], env=env, capture_output=True, text=True)


def prepare_env() -> Tuple[Dict[str, str], str, bool, str]:
    """(child environment, how the project was found, CUDA available, device description). The
    repository, and wheels from .whl/ installed for this run if the project does not import, go
    on PYTHONPATH."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    paths = [REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    note = "project imports: found"
    probe = _probe(env)
    if probe.returncode != 0:
        wheels = sorted(f for f in os.listdir(WHEELS) if f.endswith(".whl")) if osp.isdir(WHEELS) else []
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        if not wheels:
            return env, ("project imports FAILED and there are no wheels in .whl/ (run --fetch-wheels where the "
                         f"package registry is reachable): {last}"), False, "project not importable"
        site = tempfile.mkdtemp(prefix="gpu_check_site_")
        subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", site, *[osp.join(WHEELS, w) for w in wheels]], check=True)
        env["PYTHONPATH"] = os.pathsep.join([REPO, site] + paths[1:])
        probe = _probe(env)
        note = (f"installed {len(wheels)} wheels from .whl/ into {site} ({', '.join(wheels)}); project imports: "
                + ("found" if probe.returncode == 0 else "still FAILING: " + probe.stderr.strip()[-300:]))
        if probe.returncode != 0:
            return env, note, False, "project not importable"
    ok, ver, cu, name, count = probe.stdout.strip().splitlines()[-1].split("|")
    gpu = ok == "1"
    return env, note, gpu, (f"{name} x {count}, torch {ver}, CUDA {cu}" if gpu else f"torch {ver}, no CUDA")


def print_env() -> None:
    import torch

    print(f"python {platform.python_version()} ({PY}), {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
                  f"capability {p.major}.{p.minor}")
    else:
        print("CUDA: not available")
    for mod in ("torchvision", "torchreid", "numpy"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError as exc:
            print(f"{mod}: not importable ({exc})")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi"], check=False)


# The GPU issue's goals, as data: each step's figure and its bound.
GOALS = {
    "throughput_x": 2.0,  # bf16 + channels-last at least 2x Torchreid's stock fp32 engine
    "msgr_exact_x": 2.5,  # MSGR exact at most 2.5x a plain step at B = 64, 256x128
    "evaluation_s": 0.05,  # Market-shape evaluation under 0.05 s
}


def goal_lines(steps: Dict[str, Step], gpu: bool) -> List[str]:
    """The issue's goals against this run's numbers (verdicts only for a GPU run)."""
    def verdict(ok: bool) -> str:
        return ("met" if ok else "NOT met") if gpu else "n/a: CPU-sized run"

    lines = []
    t = _read_json(steps["throughput"].outputs[0]) if "throughput" in steps else None
    x = (t or {}).get("vs_torchreid", {}).get("ours bf16+channels_last")
    goal = GOALS["throughput_x"]
    lines.append(f"throughput: bf16 + channels-last = {x:.2f}x stock fp32 (goal >= {goal:g}x: {verdict(x >= goal)})"
                 if x is not None else "throughput: not measured")
    data = _read_json(steps["msgr"].outputs[0]) if "msgr" in steps else None
    for name, r in (data or {}).get("results", {}).items():
        if "exact" in r["median_s"]:
            x, goal = r["median_s"]["exact"] / r["median_s"]["plain"], GOALS["msgr_exact_x"]
            lines.append(f"MSGR exact on {name}: {x:.2f}x a plain step, median "
                         f"(goal <= {goal:g}x: {verdict(x <= goal)})")
    rows = _read_json(steps["evaluation"].outputs[0]) if "evaluation" in steps else None
    for r in rows or []:
        if r["shape"] in ("market", "tiny"):
            goal = GOALS["evaluation_s"]
            lines.append(f"{r['shape']}-shape evaluation, {r['method']}: {r['eval_s']:.4f} s (goal < {goal:g} s: "
                         f"{verdict(r['eval_s'] < goal)})")
    p = steps.get("pytest_cuda")
    if p:
        passed = p.status == "ok" and " passed" in p.summary and "failed" not in p.summary
        lines.append(f"cuda tests: {p.summary.split(';')[0]} (goal all pass: {verdict(passed)})")
    return lines


def write_summary(out: str, steps: List[Step], header: str, env_note: str, started: str, total: float,
                  gpu: bool) -> str:
    lines = [header, "", f"Started {started}, {total:.0f} s in all. {env_note}.", "",
             "| step | what | status | time [s] | key numbers | log |", "|---|---|---|---|---|---|"]
    for s in steps:
        key = s.summary.replace("|", "/").replace("\n", " ")
        log = f"{s.name}.log" if s.status != "not run" and not s.status.startswith("not run") else "-"
        lines.append(f"| {s.name} | {s.what} | {s.status} | {s.seconds:.0f} | {key} | {log} |")
    lines += ["", "Goals (issue 15):", ""] + [f"- {g}" for g in goal_lines({s.name: s for s in steps}, gpu)]
    path = osp.join(out, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def plot(out: str, steps: List[Step]) -> None:
    """throughput.png: images/s of the throughput step's engines (if it ran and matplotlib exists)."""
    t = next((s for s in steps if s.name == "throughput"), None)
    data = _read_json(t.outputs[0]) if t is not None and t.outputs else None
    rows = list((data or {}).get("images_per_second", {}).items())
    if not rows:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r[0] for r in rows], [float(r[1]) for r in rows])
    ax.set_xlabel("training images / s")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(osp.join(out, "throughput.png"), dpi=120)
    plt.close(fig)


def check(args) -> int:
    out = osp.abspath(args.out or os.environ.get("OUT") or osp.join(REPO, "log", "gpu_check"))
    os.makedirs(out, exist_ok=True)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t_start = time.time()
    env, env_note, gpu, device_note = prepare_env()
    header = (f"GPU check on CUDA: {device_note}." if gpu else
              f"NO CUDA ({device_note}): ran on the CPU with CPU-sized settings; the CUDA tests skip and no "
              "number here is a GPU number.")
    budget = args.budget_s or (480 if gpu else 1500)
    data_root = osp.abspath(args.data_root)
    train_tmp = tempfile.mkdtemp(prefix="gpu_check_train_")
    steps = build_steps(out, gpu, data_root, train_tmp)
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in steps})
        if unknown:
            print(f"--only {unknown}: no such step; steps: {[s.name for s in steps]}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in args.only]
    print(header, flush=True)
    print(f"output folder {out}; budget {budget} s; {env_note}", flush=True)
    try:
        for s in steps:
            left = budget - (time.time() - t_start)
            if left < 5:
                s.status = "not run (over the time budget)"
                continue
            print(f"[{time.time() - t_start:6.0f} s] {s.name}: {s.what} ...", flush=True)
            run_step(s, out, env, min(s.timeout, left))
            print(f"[{time.time() - t_start:6.0f} s] {s.name}: {s.status} in {s.seconds:.0f} s. {s.summary}",
                  flush=True)
            if s.name == "train":  # keep the run's logs, metrics and TensorBoard events, not its checkpoints
                shutil.copytree(train_tmp, osp.join(out, "train"), ignore=shutil.ignore_patterns("model"),
                                dirs_exist_ok=True)
                s.summary = s.keys(s, "")
    finally:
        shutil.rmtree(train_tmp, ignore_errors=True)
    plot(out, steps)
    path = write_summary(out, steps, header, env_note, started, time.time() - t_start, gpu)
    with open(path) as f:
        print("\n" + f.read())
    if args.tar:
        with tarfile.open(args.tar, "w:gz") as tf:
            tf.add(out, arcname=osp.basename(out.rstrip("/")) or "gpu_check")
        print(f"archive: {args.tar}")
    bad = [s.name for s in steps if s.status != "ok"]
    if bad:
        print(f"not ok: {bad}", file=sys.stderr)
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# wheels for a machine without the package registry


def fetch_wheels(dest: str) -> int:
    from importlib import metadata

    os.makedirs(dest, exist_ok=True)
    pins = []
    for name in WHEEL_PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            print(f"{name} is not installed here; install the project first (pip install -e .)", file=sys.stderr)
            return 2
    torchreid = [p for p in pins if p.startswith("torchreid==")]
    others = [p for p in pins if not p.startswith("torchreid==")]
    # pure-Python wheels: any platform; torchreid 0.2.5 exists only as an sdist, so build its wheel
    cmds = [[PY, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", dest, *others],
            [PY, "-m", "pip", "wheel", "--no-deps", "-w", dest, *torchreid]]
    for cmd in cmds:
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode != 0:
            return 1
    wheels = sorted(f for f in os.listdir(dest) if f.endswith(".whl"))
    print(f"{dest}: {', '.join(wheels)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("out", nargs="?", default=None, help="output folder (default: $OUT, else log/gpu_check)")
    p.add_argument("--tar", default=None, help="also pack the output folder into this .tar.gz")
    p.add_argument("--budget-s", type=float, default=None, help="time for all steps (default GPU 480, CPU 1500)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--data-root", default=osp.join(REPO, "reid-data"), help="where SynthReID is generated")
    p.add_argument("--fetch-wheels", nargs="?", const=WHEELS, default=None, metavar="DIR",
                   help="download / build the wheels a bare PyTorch machine needs into DIR (default .whl) and exit")
    p.add_argument("--env", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s is not None and not args.budget_s > 0:
        p.error(f"--budget-s {args.budget_s}: must be > 0")
    if args.fetch_wheels:
        return fetch_wheels(osp.abspath(args.fetch_wheels))
    if args.env:
        print_env()
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
