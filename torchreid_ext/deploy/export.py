"""Export the eval-mode model (normalised image batch -> embedding) to ONNX or TorchScript.

The exported graph takes ``images``: float32 N x 3 x H x W, RGB, resized to the export size and
normalised with ``data.norm_mean`` / ``data.norm_std`` (Torchreid's test transform), and returns
``features``: N x D float32, the model's embedding (not L2-normalised; ``test.flip`` is not part
of the graph). N is dynamic; H and W are fixed at export.

* ONNX: torch's ``torch.export``-based exporter (``onnxscript``), opset :data:`ONNX_OPSET`, one
  self-contained file, metadata (model, size, normalisation) in ``metadata_props``.
* TorchScript: ``torch.jit.trace`` (deprecated by torch in favour of ``torch.export``, but still
  what many C++ / mobile deployments load), metadata in the extra file ``torchreid_ext.json``.

Every file is checked before it is put in place: outputs of the exported file (onnxruntime on
CPU, or the reloaded TorchScript module) against PyTorch's on a random batch and on one real
image; it passes when ``max |difference| <= atol + rtol * max |PyTorch output|``. A file that fails
(or any error during export) leaves nothing at the output path.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os.path as osp
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np
import torch

from ..checkpoint import is_torchscript
from ..config import check_input_size
from ..data.checks import set_max_image_side
from ..errors import InputNotFound, UserError
from ..files import atomic_output, missing_file_reason
from ..memory import allocation_failures, check_memory, meta_model
from ..models import ModelOptions
from .errors import DeployInputError, ExportCheckError, check_output_path, require
from .images import dataset_images, eval_transform, load_image
from .model import build_eval_model, resolve_weights

__all__ = ["FORMATS", "ONNX_OPSET", "EXPORT_KIND", "ExportResult", "export_model", "is_export_file", "run_exported"]

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18  # Conv, BatchNormalization, Resize (nearest), GlobalAveragePool, Gemm, ... all covered
EXTRA_FILE = "torchreid_ext.json"  # TorchScript metadata
EXAMPLE_BATCH = 2  # batch of the traced example; 1 would specialise the batch axis


@dataclass
class ExportResult:
    """Where the file went and how closely it reproduces PyTorch."""

    path: str
    format: str
    model_name: str
    height: int
    width: int
    embedding_dim: int
    check_image: str  # '' when no image was available: the random batch only
    max_abs_diff: Dict[str, float] = field(default_factory=dict)  # per check input
    max_abs_ref: Dict[str, float] = field(default_factory=dict)  # max |PyTorch output| per check input
    tolerance: float = 0.0  # the largest difference that passes (over all check inputs)
    replaced: bool = False  # an existing file at ``path`` was replaced

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        return (f"{self.format} export of '{self.model_name}' ({self.height}x{self.width} -> "
                f"{self.embedding_dim}-d) to '{self.path}': max |difference| vs PyTorch: {diffs} "
                f"(tolerance {self.tolerance:.2e})" + ("; replaced the existing file" if self.replaced else ""))


def _metadata(cfg, height: int, width: int, dim: int, weights: str) -> Dict[str, str]:
    from .. import __version__

    return {
        "model_name": cfg.model.name,
        "input": f"images: float32 Nx3x{height}x{width}, RGB in [0, 1] normalised with mean and std",
        "height": str(height), "width": str(width),
        "norm_mean": json.dumps([float(v) for v in cfg.data.norm_mean]),
        "norm_std": json.dumps([float(v) for v in cfg.data.norm_std]),
        "output": f"features: float32 Nx{dim} (not L2-normalised)",
        "weights": osp.basename(weights), "torchreid_ext_version": __version__,
    }


@contextlib.contextmanager
def _quiet_jit():
    """torch.jit's deprecation warnings (we use it on purpose: TorchScript is asked for)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated")
        yield


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str, meta: Dict[str, str], opset: int) -> None:
    import onnx

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in traced libraries)
        torch.onnx.export(
            model, (example,), path, dynamo=True, input_names=["images"], output_names=["features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset, external_data=False,
            verbose=False,
        )
    proto = onnx.load(path)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str, meta: Dict[str, str]) -> None:
    with _quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, path, _extra_files={EXTRA_FILE: json.dumps(meta)})


def run_exported(path: str, fmt: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the exported file on a float32 batch: onnxruntime on CPU for ONNX,
    ``torch.jit.load`` for TorchScript (the way a deployment loads it)."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = torch.get_num_threads()  # as many threads as the PyTorch side
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    with _quiet_jit():
        module = torch.jit.load(path, map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run


def is_export_file(path: str) -> bool:
    """Whether ``path`` is a TorchScript archive or an ONNX model (what an export writes; any other
    file at the output path is left alone unless forced)."""
    if is_torchscript(path):
        return True
    try:
        import onnx

        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - protobuf rejects a file that is not ONNX in many ways (or onnx is absent)
        return False
    return proto.ir_version > 0 and len(proto.graph.node) > 0


# what an export writes, for check_output_path
EXPORT_KIND = ("an ONNX or TorchScript file (an earlier export)", is_export_file)


def _default_check_image(cfg) -> str:
    """The first query image of the first target dataset, or '' (with a warning) when there is
    none: the export is then checked on the random batch only."""
    problem = "data.targets is empty"
    if cfg.data.targets:
        try:
            return dataset_images(cfg, cfg.data.targets[0], "query").paths[0]
        except UserError as exc:
            problem = f"data.targets[0] = '{cfg.data.targets[0]}' is not usable: {exc}"
    logger.warning("No real image to check the export with (%s); checking on the random batch only. Give "
                   "--check-image PATH to check on a real image too", problem)
    return ""


def export_model(
    cfg,
    out: str,
    format: str,
    *,
    weights: str = "",
    height: Optional[int] = None,
    width: Optional[int] = None,
    check_image: Optional[str] = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    check_batch: int = 3,
    opset: int = ONNX_OPSET,
    force: bool = False,
    config_file: str = "",
) -> ExportResult:
    """Export ``cfg.model.name`` with ``weights`` (as :func:`~torchreid_ext.deploy.extract_features`
    finds them) to ``out`` in ``format`` ('onnx' or 'torchscript') at ``height`` x ``width``
    (default ``data.height`` x ``data.width``), on the CPU in float32, and check it (module
    docstring). ``check_image`` defaults to the first query image of ``data.targets[0]``. ``out`` must
    not be the weights file, the check image or ``config_file``, nor an existing file other than an
    ONNX or TorchScript one unless ``force``; the memory the model needs at that size is checked
    before it is built."""
    if format not in FORMATS:
        raise DeployInputError(f"format = {format!r} is not valid; choose one of {list(FORMATS)}")
    height = int(cfg.data.height if height is None else height)
    width = int(cfg.data.width if width is None else width)
    check_input_size(height, width, max(check_batch, EXAMPLE_BATCH), cfg.data.max_image_side,
                     names=("height", "width") if (height, width) != (cfg.data.height, cfg.data.width)
                     else ("data.height", "data.width"))
    if atol < 0 or rtol < 0 or check_batch < 1:
        raise DeployInputError(f"atol = {atol}, rtol = {rtol} must be >= 0 and check_batch = {check_batch} >= 1")
    if format == "onnx":
        if opset < ONNX_OPSET:
            raise DeployInputError(f"opset = {opset}: torch's exporter needs at least {ONNX_OPSET}")
        require("onnx", "onnxscript", "onnxruntime")
    weights = resolve_weights(cfg, weights)
    out = check_output_path(out, "export file", inputs={"weights file": weights, "--check-image": check_image or "",
                                                        "--config": config_file}, kind=EXPORT_KIND, force=force)
    transform = eval_transform(height, width, cfg.data.norm_mean, cfg.data.norm_std)
    if check_image and not osp.isfile(check_image):
        raise InputNotFound(f"check image '{check_image}' {missing_file_reason(check_image)}")
    lower = "--height / --width" if (height, width) != (cfg.data.height, cfg.data.width) else "data.height / data.width"
    model_options = ModelOptions.from_config(cfg)
    check_memory(lambda: meta_model(model_options), batch=max(check_batch, EXAMPLE_BATCH), height=height, width=width,
                 train=False, what=f"export of '{cfg.model.name}' at {height}x{width}", lower=lower)
    set_max_image_side(cfg.data.max_image_side)  # a check image declaring a larger side is refused unread
    check_image = check_image or _default_check_image(cfg)
    image = load_image(check_image, transform) if check_image else None
    with allocation_failures(f"export of '{cfg.model.name}' at {height}x{width}", lower):
        return _export(cfg, out, format, weights, height, width, check_image, image, atol, rtol, check_batch, opset)


def _export(cfg, out: str, format: str, weights: str, height: int, width: int, check_image: str,
            image: Optional[torch.Tensor], atol: float, rtol: float, check_batch: int, opset: int) -> ExportResult:
    """:func:`export_model`'s work, once every input is checked."""
    model, weights = build_eval_model(cfg, weights, torch.device("cpu"))
    model = model.float()

    generator = torch.Generator().manual_seed(0)
    inputs = {f"random batch {check_batch}x3x{height}x{width}": torch.randn(check_batch, 3, height, width,
                                                                           generator=generator)}
    if image is not None:
        inputs[f"image '{osp.basename(check_image)}'"] = image
    with torch.no_grad():
        refs = {k: model(x).float().numpy() for k, x in inputs.items()}
    dim = int(next(iter(refs.values())).shape[1])
    meta = _metadata(cfg, height, width, dim, weights)
    example = torch.randn(EXAMPLE_BATCH, 3, height, width, generator=generator)

    result = ExportResult(out, format, cfg.model.name, height, width, dim, check_image)
    replaced = osp.exists(out)
    with atomic_output(out) as tmp:
        if format == "onnx":
            _export_onnx(model, example, tmp, meta, opset)
        else:
            _export_torchscript(model, example, tmp, meta)
        run = run_exported(tmp, format)
        for key, x in inputs.items():
            got = run(x.numpy())
            if got.shape != refs[key].shape:
                raise ExportCheckError(f"{format} export of '{cfg.model.name}': output shape {got.shape} for "
                                       f"{key}, PyTorch gives {refs[key].shape}")
            result.max_abs_diff[key] = float(np.abs(got - refs[key]).max())
            result.max_abs_ref[key] = float(np.abs(refs[key]).max())
        result.tolerance = atol + rtol * max(result.max_abs_ref.values())
        worst = max(result.max_abs_diff.values())
        if not worst <= result.tolerance:  # also catches NaN
            raise ExportCheckError(f"{result.summary()}: FAILED, the file was not kept")
    result.replaced = replaced
    logger.info("%s", result.summary())
    return result
