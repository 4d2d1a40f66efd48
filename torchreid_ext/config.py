"""Configuration: upstream Torchreid's keys and defaults, plus torchreid_ext's sections.

Every key of upstream ``scripts/default_config.py`` is here with the same default, so
upstream YAML files load unchanged. Our sections (``model.msfl``, ``loss.drsl``,
``loss.sn``, ``msgr``, ``test.evaluator``, ``train.amp``, ...) are documented in
docs/configuration.md. Loading differs from plain yacs in three ways:

* a misspelt key fails with :class:`ConfigError` naming the key and the closest valid one;
* ``_BASE_: other.yaml`` (a path or a list, relative to the file) inherits from other files;
* values are coerced where the intent is unambiguous: int -> float, a numeric string
  (``inf``) -> float, a scalar -> a one-element list, list <-> tuple.

Why one module of ~490 lines: half of it is the default tree (upstream's keys, one line each, kept
together so a diff against upstream's ``default_config.py`` stays readable); the rest is loading
and ``validate_config``, the single home of every cross-key rule.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from .data.checks import DataOptions
from .distributed import DistOptions
from .engines.options import EngineOptions
from .errors import ConfigError, yaml_problem
from .files import read_text
from .losses import registry as loss_registry
from .metrics.evaluation import EvaluationOptions
from .metrics.knn_index import KNNOptions
from .models.msfl import MSFLOptions
from .msgr.options import MSGROptions
from .options import is_int, is_number
from .torchrun import env_world_size

__all__ = [
    "CN",
    "ConfigError",
    "get_default_config",
    "load_config",
    "merge_dict",
    "merge_from_file",
    "merge_from_list",
    "validate_config",
    "check_input_size",
    "flat_keys",
]

BASE_KEY = "_BASE_"


# The components that own config keys (each key's default, allowed values and checks are
# declared once, in its component's options dataclass; :mod:`torchreid_ext.options`).
OWNERS = (DataOptions, MSFLOptions, EngineOptions, MSGROptions, DistOptions, EvaluationOptions, KNNOptions)


def _set(cfg: CN, key: str, value: Any) -> None:
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node:
            node[part] = CN()
        node = node[part]
    node[parts[-1]] = copy.deepcopy(value)


def get_default_config() -> CN:
    """Upstream Torchreid's keys and defaults, then every owned section's (:data:`OWNERS`) and
    one section per registered loss."""
    cfg = CN()
    cfg.use_gpu = True  # use a GPU when one is present (upstream sets this in main.py)

    # ---------------- upstream: model ----------------
    cfg.model = CN()
    cfg.model.name = "resnet50"
    cfg.model.pretrained = True
    cfg.model.load_weights = ""
    cfg.model.resume = ""  # path, or "auto": the newest checkpoint in <save_dir>/model
    cfg.model.backbone_weights = ""  # ours: local torchvision ImageNet ResNet50 state dict (M7)

    # ---------------- upstream: data ----------------
    cfg.data = CN()
    cfg.data.type = "image"
    cfg.data.root = "reid-data"
    cfg.data.sources = ["market1501"]
    cfg.data.targets = ["market1501"]
    cfg.data.workers = 4
    cfg.data.split_id = 0
    cfg.data.height = 256
    cfg.data.width = 128
    cfg.data.combineall = False
    cfg.data.transforms = ["random_flip"]
    cfg.data.k_tfm = 1
    cfg.data.norm_mean = [0.485, 0.456, 0.406]
    cfg.data.norm_std = [0.229, 0.224, 0.225]
    cfg.data.save_dir = "log"
    cfg.data.load_train_targets = False

    cfg.market1501 = CN()
    cfg.market1501.use_500k_distractors = False
    cfg.cuhk03 = CN()
    cfg.cuhk03.labeled_images = False
    cfg.cuhk03.classic_split = False

    cfg.sampler = CN()
    cfg.sampler.train_sampler = "RandomSampler"
    cfg.sampler.train_sampler_t = "RandomSampler"
    cfg.sampler.num_instances = 4
    cfg.sampler.num_cams = 1
    cfg.sampler.num_datasets = 1
    # ours: train a ranking loss (triplet, drsl, sn) with a sampler that gives anchors no
    # same-identity image (RandomSampler, ...); refused unless True
    cfg.sampler.allow_batches_without_positives = False

    cfg.video = CN()
    cfg.video.seq_len = 15
    cfg.video.sample_method = "evenly"
    cfg.video.pooling_method = "avg"

    # ---------------- upstream: train ----------------
    cfg.train = CN()
    cfg.train.optim = "adam"
    cfg.train.lr = 0.0003
    cfg.train.weight_decay = 5e-4
    cfg.train.max_epoch = 60
    cfg.train.start_epoch = 0
    cfg.train.batch_size = 32
    cfg.train.fixbase_epoch = 0
    cfg.train.open_layers = ["classifier"]
    cfg.train.staged_lr = False
    cfg.train.new_layers = ["classifier"]
    cfg.train.base_lr_mult = 0.1
    cfg.train.lr_scheduler = "single_step"
    cfg.train.stepsize = [20]
    cfg.train.gamma = 0.1
    cfg.train.print_freq = 20
    cfg.train.seed = 1

    cfg.sgd = CN()
    cfg.sgd.momentum = 0.9
    cfg.sgd.dampening = 0.0
    cfg.sgd.nesterov = False
    cfg.rmsprop = CN()
    cfg.rmsprop.alpha = 0.99
    cfg.adam = CN()
    cfg.adam.beta1 = 0.9
    cfg.adam.beta2 = 0.999

    # ---------------- upstream: loss (one section per registered loss) ----------------
    cfg.loss = CN()
    cfg.loss.name = "softmax"  # any registered loss: softmax | triplet | drsl | sn | ...
    for spec in loss_registry.specs():
        cfg.loss[spec.name] = CN(copy.deepcopy(dict(spec.defaults)))

    # ---------------- upstream: test ----------------
    cfg.test = CN()
    cfg.test.batch_size = 100
    cfg.test.evaluate = False
    cfg.test.eval_freq = -1
    cfg.test.start_eval = 0
    cfg.test.visactmap = False  # legacy upstream key, still present in its OSNet configs

    # ---------------- owned sections: model.msfl, msgr, dist, our data / train / test keys ----
    for owner in OWNERS:
        for key, value in owner.config_defaults().items():
            _set(cfg, key, value)
    return cfg


# Keys whose value may legitimately be a scalar or a list of scalars.
_SCALAR_OR_LIST = {"msgr.eps"}

# Torchreid's build_transforms knows these names (anything else is silently ignored there).
TRANSFORMS = ("random_flip", "random_crop", "random_patch", "color_jitter", "random_erase")


def flat_keys(node: CN, prefix: str = "") -> List[str]:
    """All leaf keys of a config as dotted paths."""
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        if isinstance(v, CN):
            keys.extend(flat_keys(v, full + "."))
        else:
            keys.append(full)
    return keys


def _unknown_key(full_key: str, cfg: CN, where: str, section: bool = False) -> ConfigError:
    """Unknown ``full_key``, with the closest valid name: a section for a ``section`` (a YAML
    mapping), else a key or a section."""
    sections = list(_all_section_keys(cfg))
    valid = sections if section else flat_keys(cfg) + sections
    close = difflib.get_close_matches(full_key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown config key '{full_key}'{where}{hint}")


def _all_section_keys(node: CN, prefix: str = "") -> Iterable[str]:
    for k, v in node.items():
        if isinstance(v, CN):
            yield f"{prefix}{k}"
            yield from _all_section_keys(v, f"{prefix}{k}.")


def _coerce(value: Any, original: Any, full_key: str, where: str) -> Any:
    """Return ``value`` converted to the type of ``original``, or raise ConfigError."""
    if isinstance(original, CN):
        raise ConfigError(f"Config key '{full_key}'{where} is a section, not a value")
    if full_key in _SCALAR_OR_LIST and not isinstance(value, (list, tuple)):
        value = [value]
    if isinstance(original, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(original, float):
        if is_number(value):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(original, int):
        if is_int(value):
            return value
    elif isinstance(original, str):
        if isinstance(value, str):
            return value
    elif isinstance(original, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return type(original)(value)
        if isinstance(value, str) or is_number(value):
            return type(original)([value])
    elif original is None:
        return value
    raise ConfigError(
        f"Config key '{full_key}'{where} expects {type(original).__name__} "
        f"(default {original!r}), got {type(value).__name__} {value!r}"
    )


def merge_dict(cfg: CN, data: dict, where: str = "", _prefix: str = "", _root: Optional[CN] = None) -> None:
    """Merge a plain nested dict into ``cfg`` with key checks and coercion."""
    root = cfg if _root is None else _root
    for key, value in data.items():
        full_key = f"{_prefix}{key}"
        if key not in cfg:
            raise _unknown_key(full_key, root, where, section=isinstance(value, dict))
        if isinstance(cfg[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"Config key '{full_key}'{where} is a section; expected a mapping, got {value!r}"
                )
            merge_dict(cfg[key], value, where, full_key + ".", root)
        else:
            cfg[key] = _coerce(value, cfg[key], full_key, where)


def _read_yaml_with_bases(path: str, seen: Sequence[str] = ()) -> List[tuple]:
    """Return [(path, mapping), ...] with base files first."""
    path = os.path.abspath(os.path.expanduser(path))
    if path in seen:
        raise ConfigError(f"Config inheritance cycle: {' -> '.join(list(seen) + [path])}")
    if os.path.isdir(path):
        raise ConfigError(f"Config file '{path}' is a folder, not a YAML file; name a .yaml file in it")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file '{path}' does not exist")
    text = read_text(path, "Config file", ConfigError)  # UTF-8 (a byte-order mark is dropped)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(
            f"{BASE_KEY} in '{path}' must be a file path or a list of paths (relative to the file), "
            f"got {bases!r}"
        )
    chain: List[tuple] = []
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        chain.extend(_read_yaml_with_bases(base_path, list(seen) + [path]))
    chain.append((path, data))
    return chain


def merge_from_file(cfg: CN, path: str) -> CN:
    for file_path, data in _read_yaml_with_bases(path):
        merge_dict(cfg, data, where=f" in {file_path}")
    return cfg


def _decode(value: str) -> Any:
    """Decode a command-line value as YAML (so 'True', '[1, 2]', '1e-3', 'inf' work)."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def merge_from_list(cfg: CN, opts: Sequence[str]) -> CN:
    """Apply ``KEY VALUE`` pairs (upstream's trailing command-line overrides)."""
    opts = list(opts or [])
    if len(opts) % 2:
        raise ConfigError(
            f"Overrides must be KEY VALUE pairs; got an odd number of items: {opts}"
        )
    for full_key, raw in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = full_key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CN):
                raise _unknown_key(full_key, cfg, " on the command line")
            node = node[part]
        if parts[-1] not in node:
            raise _unknown_key(full_key, cfg, " on the command line")
        value = _decode(raw)
        # A string default stays a string even if the text looks like a number or bool.
        if isinstance(node[parts[-1]], str) and not isinstance(value, str):
            value = str(raw)
        node[parts[-1]] = _coerce(value, node[parts[-1]], full_key, " on the command line")
    return cfg


def validate_config(cfg: CN) -> None:
    """Fail fast on values that are invalid whatever the data (before any long work): upstream's
    keys here, each owned key by its owner (:data:`OWNERS`), then the rules between sections."""
    if cfg.data.type != "image":
        raise ConfigError(f"data.type = {cfg.data.type!r} is not valid; choose one of ['image']")
    unknown = [t for t in cfg.data.transforms if str(t).lower() not in TRANSFORMS]
    if unknown:
        raise ConfigError(
            f"data.transforms has unknown entries {unknown}; choose from {list(TRANSFORMS)} "
            "(on the command line, put KEY VALUE overrides after an option that takes one value, "
            "e.g. after --root, not right after --transforms, -s or -t)"
        )
    for name in ("train.batch_size", "test.batch_size", "train.max_epoch"):
        sec, key = name.split(".")
        if cfg[sec][key] < (0 if key == "max_epoch" else 1):
            raise ConfigError(f"{name} = {cfg[sec][key]} must be positive")
    if not 0 <= cfg.train.seed < 2 ** 32:
        raise ConfigError(f"train.seed = {cfg.train.seed} is not valid; a seed is an integer in [0, 2**32 - 1]")
    if not cfg.train.lr >= 0:
        raise ConfigError(f"train.lr = {cfg.train.lr} is not valid; the learning rate must be >= 0")
    k = cfg.sampler.num_instances
    if k < 1:
        raise ConfigError(f"sampler.num_instances = {k} is not valid; it must be >= 1 (the images per "
                          "identity in a RandomIdentitySampler batch)")
    for owner in OWNERS:
        owner.from_config(cfg)
    check_input_size(cfg.data.height, cfg.data.width, max(cfg.train.batch_size, cfg.test.batch_size),
                     cfg.data.max_image_side)
    if cfg.sampler.train_sampler in IDENTITY_SAMPLERS:
        bs = cfg.train.batch_size
        if bs % k:
            raise ConfigError(
                f"train.batch_size = {bs} is not divisible by sampler.num_instances = {k}; "
                "RandomIdentitySampler draws batch_size / num_instances identities with "
                f"num_instances images each (e.g. batch_size {k * max(bs // k, 1)})"
            )
    if cfg.test.visrank and not cfg.test.evaluate:
        raise ConfigError("test.visrank = True draws rank lists of an evaluation-only run; set test.evaluate True "
                          "(or draw them after training with scripts/visualize_ranks.py)")
    if cfg.train.fixbase_epoch > 0 and cfg.msgr.enabled and cfg.msgr.mode == "fast" and env_world_size() > 1:
        # fixbase freezes parameters, so DDP needs find_unused_parameters, with which fast
        # mode's second forward loses its perturbation (measured: R_fd = 0, no R gradient)
        raise ConfigError(f"train.fixbase_epoch = {cfg.train.fixbase_epoch} with msgr.mode = 'fast' is not "
                          "supported under torchrun; set train.fixbase_epoch 0 or msgr.mode exact")
    _validate_scale_out(cfg)
    _validate_losses(cfg)


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_input_size(height: int, width: int, batch: int, max_side: int,
                     names: Sequence[str] = ("data.height", "data.width")) -> None:
    """ConfigError unless ``height`` x ``width`` is a usable input size: each side in
    [1, ``max_side``] (``data.max_image_side``), and a float32 batch of ``batch`` such images fits
    in half of this machine's memory (a model needs many times its input; this refuses only sizes
    that cannot possibly fit)."""
    need = batch * 3 * height * width * 4
    memory = _memory_bytes()
    for name, value, side in zip(names, (height, width), ("height", "width")):
        if value < 1:
            raise ConfigError(f"{name} = {value} is not valid; the input image {side} must be >= 1 pixel")
        if value > max_side:
            raise ConfigError(f"{name} = {value} is above data.max_image_side = {max_side} pixels (a batch of "
                              f"{batch} images at {height}x{width} needs {need / 2 ** 30:.1f} GiB for its input "
                              "alone); raise data.max_image_side to allow it")
    if memory is not None and need > memory // 2:
        raise ConfigError(f"input size {height}x{width} with a batch of {batch} needs {need / 2 ** 30:.1f} GiB for the "
                          f"input alone, more than half of this machine's {memory / 2 ** 30:.1f} GiB; lower "
                          f"{names[0]} / {names[1]} or the batch size")


# Train samplers that put several images of each identity in a batch (positives for ranking losses).
IDENTITY_SAMPLERS = ("RandomIdentitySampler",)


def _validate_losses(cfg: CN) -> None:
    """``loss.name`` is registered; every loss section passes its loss's constructor checks
    (whichever loss is selected); the selected loss's weights, batch size and sampler fit."""
    names = loss_registry.loss_names()
    name = cfg.loss.name
    if name not in names:
        raise ConfigError(f"loss.name = {name!r} is unknown; choose one of {names}")
    if name not in cfg.loss:
        raise ConfigError(f"loss.name = {name!r} was registered after this config was built (it has no "
                          f"loss.{name} section); call register_loss before get_default_config / load_config")
    try:
        for spec in loss_registry.specs():
            if spec.name in cfg.loss:
                section = cfg.loss[spec.name]
                loss_registry.check_loss_weights(loss_registry.section_weights(spec.name, section),
                                                 require_positive=False)
                if spec.builder is not None:
                    loss_registry.build_loss(spec.name, section)
        weight_x, terms = loss_registry.loss_terms(loss_registry.LossOptions.from_config(cfg))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # upstream's check_cfg: with no ID-loss term the classifier gets no gradient
    if weight_x == 0 and cfg.train.fixbase_epoch > 0:
        raise ConfigError(
            f"train.fixbase_epoch = {cfg.train.fixbase_epoch} trains only "
            f"{list(cfg.train.open_layers)} at first, but loss '{name}' has no "
            f"cross-entropy term (loss.{name}.weight_x = 0), so the classifier gets no gradient; "
            "set train.fixbase_epoch 0 or a positive weight_x"
        )
    ranking = [t for t in terms if loss_registry.get_loss(t).needs_positives]
    sampler = cfg.sampler.train_sampler
    if ranking and sampler not in IDENTITY_SAMPLERS and not cfg.sampler.allow_batches_without_positives:
        raise ConfigError(
            f"loss.name = '{name}' trains ranking term(s) {ranking}, which need images of the same "
            f"identity in each batch, but sampler.train_sampler = '{sampler}' does not put them there "
            "(anchors without a positive are skipped); set sampler.train_sampler RandomIdentitySampler "
            "(sampler.num_instances images per identity), or sampler.allow_batches_without_positives True "
            "to train this way anyway"
        )
    batch = cfg.train.batch_size
    if cfg.dist.gather_features and env_world_size() > 1:
        batch *= env_world_size()  # the losses see every rank's batch
    for term in terms:
        rule = loss_registry.get_loss(term).min_batch_size
        if rule is None:
            continue
        need, why = rule(cfg.loss[term])
        if batch < need:
            seen = "" if batch == cfg.train.batch_size else f" ({batch} over all ranks with dist.gather_features)"
            raise ConfigError(f"train.batch_size = {cfg.train.batch_size}{seen} is too small: {why}, "
                              f"i.e. a batch of at least {need} images")


def _validate_scale_out(cfg: CN) -> None:
    """train.amp / train.sync_bn / dist.* combinations that cannot work (docs/methods.md G6)."""
    import torch

    if cfg.train.amp == "fp16" and not (cfg.use_gpu and torch.cuda.is_available()):
        raise ConfigError("train.amp = 'fp16' needs a CUDA GPU (fp16 autocast with a GradScaler); this run "
                          "is on the CPU: use train.amp bf16 or none")
    if cfg.train.sync_bn and cfg.msgr.enabled and cfg.msgr.mode == "exact":
        raise ConfigError("train.sync_bn = True with msgr.mode = 'exact': exact MSGR needs a double "
                          "backward, which SyncBatchNorm does not have (docs/methods.md G6); set msgr.mode fast "
                          "or train.sync_bn False")
    if cfg.dist.gather_features and cfg.loss.name == "softmax":
        raise ConfigError("dist.gather_features = True has no effect with loss.name = 'softmax' (no batch "
                          "ranking loss to gather for); use triplet, drsl or sn, or set it False")


def load_config(
    path: Optional[str] = None, opts: Optional[Sequence[str]] = None, validate: bool = True
) -> CN:
    """Default config, then the file (with its bases), then ``KEY VALUE`` overrides."""
    cfg = get_default_config()
    if path:
        merge_from_file(cfg, path)
    merge_from_list(cfg, opts or [])
    if validate:
        validate_config(cfg)
    return cfg
