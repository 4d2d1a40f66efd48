"""Checkpoints that are safe to load, survive a kill, and resume bit-for-bit.

* Saving writes plain Python numbers and tensors only, to a temporary file that is
  fsync'ed and renamed over the target: a run killed at any moment leaves the previous
  checkpoint loadable. A full disk is a :class:`DiskFullError` naming the file (torch's
  own message is ``unexpected pos ...``); the target is left as it was, no temporary file.
* Loading always uses ``torch.load(weights_only=True)``. Torchreid's own checkpoints
  pickle a numpy scalar (``rank1``), which that mode rejects; we allow exactly the numpy
  scalar/dtype types such files contain. A file that needs anything else is refused:
  unpickling arbitrary globals runs code from the file.
* The Python, numpy and torch RNG states travel with the checkpoint, so a resumed run
  draws the same batches and augmentations as an uninterrupted one.
* Under DistributedDataParallel each rank has its own streams (augmentation, dropout) and
  only rank 0 writes checkpoints. Instead of gathering every rank's state, the engine
  reseeds every stream at each epoch start from ``(seed, epoch, rank)`` (:func:`seed_epoch`)
  and samplers are epoch-seeded, so resuming at an epoch boundary (the only place a
  checkpoint is written) is exact on every rank; the saved state is then overridden.
"""
from __future__ import annotations

import glob
import logging
import os
import os.path as osp
import pickle
import random
import re
import zipfile
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import torch

from .distributed import unwrap_model
from .errors import CheckpointError, DiskFullError, InputNotFound
from .files import atomic_output, missing_file_reason
from .options import is_int, is_number

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "DiskFullError",
    "atomic_write_bytes",
    "save_checkpoint",
    "load_checkpoint",
    "is_torchscript",
    "torch_load",
    "check_checkpoint",
    "state_dict_of",
    "load_state_dict_from_url",
    "capture_rng_state",
    "restore_rng_state",
    "seed_epoch",
    "latest_checkpoint",
    "resume_from_checkpoint",
    "load_model_weights",
    "load_pretrained_weights",
    "strip_module_prefix",
    "CHECKPOINT_NAME",
]


def _numpy_allowlist() -> list:
    """The numpy globals a Torchreid checkpoint (numpy 1.x or 2.x) may reference."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allow = [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # written by numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
    ]
    for name in ("Float16DType", "Float32DType", "Float64DType", "Int32DType", "Int64DType"):
        cls = getattr(getattr(np, "dtypes", None), name, None)
        if cls is not None:
            allow.append(cls)
    return allow


def _to_plain(obj: Any) -> Any:
    """Replace numpy scalars/arrays by Python numbers/tensors, recursively."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _to_plain(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def atomic_write_bytes(path: str, writer: Callable[[Any], Any]) -> None:
    """Call ``writer(fileobj)`` on a temporary file next to ``path``, fsync it, then rename it into
    place (:func:`torchreid_ext.files.atomic_output`): any failure leaves ``path`` as it was; a full
    disk or quota (also as torch's ``unexpected pos`` RuntimeError) raises :class:`DiskFullError`."""
    with atomic_output(path, durable=True) as tmp:
        with open(tmp, "wb") as f:
            writer(f)


def save_checkpoint(state: Dict[str, Any], path: str) -> str:
    """Atomically save ``state`` (numpy values converted to plain ones) to ``path``."""
    plain = _to_plain(state)
    atomic_write_bytes(path, lambda f: torch.save(plain, f))
    return path


def _torch_problem(exc: BaseException) -> str:
    """torch's reason for a failed load, short and on one line, without its advice to retry with
    ``weights_only=False`` (that would run code from the file)."""
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(str(exc).split()))
    kept = [s for s in sentences if "weights_only" not in s and "arbitrary code" not in s and "trusted source" not in s]
    text = " ".join(kept) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + " ..."


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``: a zip with ``code/`` and
    ``constants.pkl``), i.e. an exported model, not a checkpoint."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _not_a_checkpoint(path: str, exc: BaseException) -> str:
    """What the file at ``path`` is, for a load that failed with ``exc``: empty, text, a damaged
    zip archive or pickle, or something else."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "is empty (0 bytes), not a weights file"
    if head.startswith(b"PK\x03\x04"):
        return ("is a zip archive that is not a readable PyTorch checkpoint (truncated or damaged?): "
                f"{_torch_problem(exc)}")
    if head[:1] == b"\x80":
        return f"is a pickle that is not a readable PyTorch checkpoint (truncated or damaged?): {_torch_problem(exc)}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "is not a PyTorch checkpoint (neither torch.save's zip format nor a pickle)"
    first = " ".join(text.split())[:40]
    return f"is a text file, not a PyTorch checkpoint (it starts with {first!r})"


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and the numpy allowlist. A file that is not a
    checkpoint is a :class:`CheckpointError` saying what it is (empty, text, damaged ...)."""
    path = osp.abspath(osp.expanduser(path))
    if not osp.isfile(path):
        raise InputNotFound(f"Checkpoint '{path}' {missing_file_reason(path)}")
    if is_torchscript(path):
        raise CheckpointError(f"Checkpoint '{path}' is a TorchScript module (an exported model, e.g. written by "
                              "export --format torchscript), not a checkpoint of weights; give the checkpoint "
                              "(model.pth.tar-N) it was exported from")
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if not found:
            raise CheckpointError(f"Checkpoint '{path}' {_not_a_checkpoint(path, exc)}") from exc
        what = f"the Python object '{found.group(1)}'"
        raise CheckpointError(
            f"Refusing to load '{path}': it contains {what}, which is not a tensor, a plain "
            "number/string/container or one of the numpy scalar types Torchreid writes. "
            "Unpickling arbitrary objects can run code hidden in the file, so torchreid_ext "
            "never loads checkpoints with weights_only=False. If you made this file yourself, "
            "re-save its tensors and numbers as a plain dict."
        ) from exc
    except Exception as exc:  # noqa: BLE001 - torch's unpickler fails in many ways on a file that is not a checkpoint
        raise CheckpointError(f"Checkpoint '{path}' {_not_a_checkpoint(path, exc)}") from exc


def torch_load(f: Union[str, "os.PathLike[str]", IO[bytes]], map_location: Any = None,
               *args: Any, **kwargs: Any) -> Any:
    """``torch.load`` as Torchreid's model modules call it (``torch.load(cached_file)``), read by the
    safe loader whatever ``weights_only`` / ``pickle_module`` / ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    say: a path through :func:`load_checkpoint`, an open file with ``weights_only=True``."""
    location = "cpu" if map_location is None else map_location
    if isinstance(f, (str, os.PathLike)):
        return load_checkpoint(os.fspath(f), map_location=location)
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(f, map_location=location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a stream that is not a safe checkpoint, whatever the cause
        name = getattr(f, "name", "an open file")
        raise CheckpointError(f"Refusing to load weights from '{name}': not a weights-only PyTorch "
                              f"checkpoint ({' '.join(str(exc).split())[:200]})") from exc


def load_state_dict_from_url(url: str, model_dir: Optional[str] = None, map_location: Any = None,
                             progress: bool = True, check_hash: bool = False, file_name: Optional[str] = None,
                             weights_only: Any = None) -> Any:
    """``torch.hub.load_state_dict_from_url`` (``torch.utils.model_zoo.load_url``, Torchreid's ImageNet
    weights) through the safe loader: the file cached under ``<hub dir>/checkpoints`` (or ``model_dir``)
    is downloaded first if absent, then read by :func:`load_checkpoint`, never with ``weights_only=False``
    (torch's default there), so a file planted in the cache cannot run code."""
    folder = model_dir or osp.join(torch.hub.get_dir(), "checkpoints")
    cached = osp.join(folder, file_name or osp.basename(urlparse(url).path))
    if not osp.exists(cached):
        os.makedirs(folder, exist_ok=True)
        found = torch.hub.HASH_REGEX.search(osp.basename(cached)) if check_hash else None
        logger.info("Downloading '%s' to '%s'", url, cached)
        torch.hub.download_url_to_file(url, cached, found.group(1) if found else None, progress=progress)
    return load_checkpoint(cached, map_location="cpu" if map_location is None else map_location)


def _show(value: Any) -> str:
    """A value for a message: short, one line."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:60] + " ..."


def state_dict_of(ckpt: Any, path: str) -> "OrderedDict[str, Any]":
    """The state dict of a loaded checkpoint (its ``state_dict``, else the dict itself) with the
    ``module.`` prefix stripped; a :class:`CheckpointError` unless it is a dict with string keys."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"Checkpoint '{path}' holds a {type(ckpt).__name__}, not a state dict or a "
                              "checkpoint dict with 'state_dict'")
    state = ckpt.get("state_dict", ckpt)
    where = "its 'state_dict'" if "state_dict" in ckpt else "it"
    if not isinstance(state, dict):
        raise CheckpointError(f"Checkpoint '{path}': {where} is a {type(state).__name__}, not a dict of tensors")
    bad = [k for k in state if not isinstance(k, str)]
    if bad:
        bad = bad[0]
        raise CheckpointError(f"Checkpoint '{path}': {where} has the key {_show(bad)} ({type(bad).__name__}); "
                              "a state dict's keys are tensor names (strings)")
    return strip_module_prefix(state)


def _check_rng(rng: Any, path: str) -> None:
    """``rng`` restores (tried on this process's generators, which are put back after)."""
    problem = None
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        problem = "not a dict with 'python', 'numpy' and 'torch' states"
    elif "cuda" in rng and not (isinstance(rng["cuda"], (list, tuple))
                                and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in rng["cuda"])):
        problem = "its 'cuda' entry is not a list of byte tensors"
    else:
        saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        try:
            restore_rng_state({k: v for k, v in rng.items() if k != "cuda"})
        except Exception as exc:  # noqa: BLE001 - random / numpy / torch reject a bad state in many ways
            problem = f"it does not restore ({type(exc).__name__}: {_torch_problem(exc)})"
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])
    if problem:
        raise CheckpointError(f"Checkpoint '{path}': 'rng' = {_show(rng)} is not a saved RNG state: {problem}")


def check_checkpoint(ckpt: Any, path: str, resume: bool = False) -> Dict[str, Any]:
    """``ckpt`` (read from ``path``) checked to hold what loading it uses, so that a crafted or
    damaged file is one :class:`CheckpointError` naming the file and the key, before any work:
    a dict whose state dict has string keys; with ``resume`` also a non-negative integer ``epoch``,
    an optimizer state ``{'state': dict, 'param_groups': [dict with 'params', ...]}``, a scheduler
    state dict, RNG states that restore, and the engine's counters and history of the right types."""
    state_dict_of(ckpt, path)
    if not resume:
        return ckpt

    def bad(key: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"Checkpoint '{path}': '{key}' = {_show(ckpt[key])} is not valid; expected {allowed}")

    if "epoch" in ckpt and not (is_int(ckpt["epoch"]) and ckpt["epoch"] >= 0):
        raise bad("epoch", "the number of finished epochs, an integer >= 0")
    if ckpt.get("max_epoch") is not None and not (is_int(ckpt["max_epoch"]) and ckpt["max_epoch"] >= 0):
        raise bad("max_epoch", "an integer >= 0 or None")
    for key, check, allowed in (("rank1", is_number, "a number"), ("train_seconds", is_number, "a number >= 0"),
                                ("train_images", is_int, "an integer >= 0")):
        if key in ckpt and not (check(ckpt[key]) and (key == "rank1" or ckpt[key] >= 0)):
            raise bad(key, allowed)
    history = ckpt.get("history", [])
    if not (isinstance(history, list) and all(isinstance(e, dict) for e in history)):
        raise bad("history", "a list of per-evaluation dicts")
    opt = ckpt.get("optimizer")
    if opt is not None and not (
            isinstance(opt, dict) and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"])):
        raise bad("optimizer", "an optimizer's state dict {'state': {...}, 'param_groups': [{'params': [...], ...}]}")
    if ckpt.get("scheduler") is not None and not isinstance(ckpt["scheduler"], dict):
        raise bad("scheduler", "an LR scheduler's state dict or None")
    if "rng" in ckpt:
        _check_rng(ckpt["rng"], path)
    return ckpt


def _fit_problem(model_state: Dict[str, torch.Tensor], state: Dict[str, Any]) -> str:
    """How ``state`` fails to fit a model with ``model_state``, summarised (counts and the first
    few keys), or '' when every tensor has its counterpart of the same shape."""
    def first(keys: list, show: Callable[[str], str] = lambda k: f"'{k}'") -> str:
        return ", ".join(show(k) for k in keys[:3]) + (" ..." if len(keys) > 3 else "")

    # BatchNorm fills a missing num_batches_tracked itself (checkpoints of torch < 0.4.1 lack it)
    missing = [k for k in model_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state]
    reshaped = [k for k in state if k in model_state and not (
        torch.is_tensor(state[k]) and state[k].shape == model_state[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(model_state)} tensors are missing from the file "
                     f"({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of the file's {len(state)} entries are not in the model ({first(unexpected)})")
    if reshaped:
        def shape(k: str) -> str:
            found = tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__
            return f"'{k}' {found} in the file vs {tuple(model_state[k].shape)}"
        parts.append(f"{len(reshaped)} differ in shape or are not tensors ({first(reshaped, shape)})")
    return "; ".join(parts)


def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as plain values and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) generators from (seed, epoch, rank)."""
    words = np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(2)
    value = int(words[0]) << 32 | int(words[1])
    random.seed(value)
    np.random.seed(int(words[0]))
    torch.manual_seed(value)  # CUDA generators too


CHECKPOINT_NAME = re.compile(r"model\.pth\.tar-(\d+)$")  # <save_dir>/model/model.pth.tar-<epoch>


def latest_checkpoint(directory: str) -> Optional[str]:
    """The ``model.pth.tar-<epoch>`` with the highest epoch in ``directory``, if any."""
    found = []
    for path in glob.glob(osp.join(directory, "model.pth.tar-*")):
        m = CHECKPOINT_NAME.search(path)
        if m:
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def resume_from_checkpoint(
    checkpoint: Union[str, Dict[str, Any]],
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Any = None,
    extra: Optional[Dict[str, Any]] = None,
    restore_rng: bool = True,
    source: str = "",
) -> int:
    """Restore weights, optimizer, scheduler (and ``extra`` objects with state dicts) from
    a path or an already loaded checkpoint; return the epoch to start from. RNG states
    are restored last."""
    ckpt = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    path = checkpoint if isinstance(checkpoint, str) else source
    check_checkpoint(ckpt, path, resume=True)
    state_dict = state_dict_of(ckpt, path)
    target = unwrap_model(model)
    problem = _fit_problem(target.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"Checkpoint '{path}' does not fit this model ({type(target).__name__}): {problem}")
    parts = [("state_dict", target, state_dict)]
    if optimizer is not None and ckpt.get("optimizer") is not None:
        parts.append(("optimizer", optimizer, ckpt["optimizer"]))
    if scheduler is not None and ckpt.get("scheduler") is not None:
        unknown = sorted(set(ckpt["scheduler"]) - set(scheduler.state_dict()))
        if unknown:
            raise CheckpointError(f"Checkpoint '{path}': 'scheduler' has entries {type(scheduler).__name__} does "
                                  f"not have: {unknown[:5]}")
        parts.append(("scheduler", scheduler, ckpt["scheduler"]))
    parts += [(key, obj, ckpt[key]) for key, obj in (extra or {}).items() if obj is not None and key in ckpt]
    for key, obj, value in parts:
        try:
            obj.load_state_dict(value)
        except Exception as exc:  # noqa: BLE001 - torch's loaders reject a mismatching state in many ways
            raise CheckpointError(f"Checkpoint '{path}': its '{key}' does not fit this run's "
                                  f"{type(obj).__name__} ({_torch_problem(exc)})") from exc
    if restore_rng and "rng" in ckpt:
        restore_rng_state(ckpt["rng"])
    epoch = int(ckpt.get("epoch", 0))
    logger.info("Resumed from '%s' (completed epochs: %d)", path, epoch)
    return epoch


def strip_module_prefix(state_dict: Dict[str, Any]) -> "OrderedDict[str, Any]":
    """The state dict with the ``module.`` prefix of (Distributed)DataParallel checkpoints removed."""
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in state_dict.items())


def load_model_weights(model: torch.nn.Module, path: str, strict: bool = False,
                       ignore: Sequence[str] = ("classifier.",), model_name: str = "") -> Dict[str, list]:
    """Torchreid's ``utils.load_pretrained_weights`` through the safe loader.

    Copies every tensor whose name (``module.`` prefix stripped) and shape match the model's
    and leaves the rest (e.g. a classifier trained for another number of identities), as
    Torchreid does; but the file is read by :func:`load_checkpoint` (``weights_only``, numpy
    allowlist), never by a plain unpickler. Returns ``{"loaded": [...], "skipped": [...],
    "reinitialised": [...]}`` (skipped tensors the model has with another shape; the log names them);
    a file of which nothing fits the model is a :class:`CheckpointError` naming the model and
    the first mismatching key. ``strict=True`` (extraction, export, rank lists of a trained
    model) also refuses a file that leaves any model tensor unloaded, except those whose name
    starts with one of ``ignore`` (the classifier: its size depends on the training set and
    eval mode does not use it). ``model_name`` (e.g. ``model.name``) names the model in messages.
    """
    ckpt = load_checkpoint(path)
    name = f"model '{model_name}'" if model_name else type(unwrap_model(model)).__name__
    state_dict = state_dict_of(ckpt, path)
    target = unwrap_model(model).state_dict()
    matched, skipped = OrderedDict(), []
    for key, value in state_dict.items():
        if key in target and torch.is_tensor(value) and value.shape == target[key].shape:
            matched[key] = value
        else:
            skipped.append(key)
    # a model made of a pretrained backbone and new parts (MSFL) picks what it takes from the file
    # (a backbone's file fills the backbone only, all of it) and says what is new
    select = getattr(unwrap_model(model), "select_loaded_weights", None)
    parts = ""
    if select is not None:
        matched, parts = select(matched, state_dict, path)
        skipped = [k for k in state_dict if k not in matched]
    if not matched:
        first = next(iter(state_dict), None)
        why = ("it holds no tensors" if first is None else
               f"first mismatching key '{first}'" + (
                   f" (shape {tuple(state_dict[first].shape)} vs {tuple(target[first].shape)})"
                   if first in target and torch.is_tensor(state_dict[first]) else " (not in the model)"))
        raise CheckpointError(
            f"Weights file '{path}' does not fit {name}: no tensor matches "
            f"by name and shape; {why}")
    if strict:
        missing = [k for k in target if k not in matched and not k.startswith(tuple(ignore))]
        if missing:
            key = missing[0]
            why = (f"shape {tuple(state_dict[key].shape)} in the file vs {tuple(target[key].shape)}"
                   if key in state_dict and torch.is_tensor(state_dict[key]) else "absent from the file")
            raise CheckpointError(
                f"Weights file '{path}' does not fit {name}: {len(missing)} of its "
                f"tensors are not loaded, the first '{key}' ({why})")
    target.update(matched)
    unwrap_model(model).load_state_dict(target)
    reshaped = [k for k in skipped if k in target and torch.is_tensor(state_dict[k])]
    absent = [k for k in skipped if k not in reshaped]
    notes = []
    if reshaped:
        shapes = ", ".join(f"{k} {tuple(state_dict[k].shape)} in the file vs {tuple(target[k].shape)}"
                           for k in reshaped[:4])
        notes.append(f"re-initialised {len(reshaped)} whose shape differs, kept as the model built them "
                     f"(a classifier sized for this training set's identities): {shapes}"
                     + (" ..." if len(reshaped) > 4 else ""))
    if absent:
        notes.append(f"ignored {len(absent)} the model does not have: {absent[:5]}"
                     + (" ..." if len(absent) > 5 else ""))
    if parts:  # the model's own account replaces the generic one
        notes = [parts]
    logger.info("Loaded %d of %d tensors from '%s'%s", len(matched), len(state_dict), path,
                "; " + "; ".join(notes) if notes else "")
    return {"loaded": list(matched), "skipped": skipped, "reinitialised": reshaped}


# Torchreid's name for the same operation (``torchreid.utils.load_pretrained_weights``), for users
# who know that one; both read through the safe loader.
load_pretrained_weights = load_model_weights
