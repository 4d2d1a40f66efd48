"""After training: extract features to files, evaluate saved features, export for deployment, search crops.

    from torchreid_ext.config import load_config
    from torchreid_ext import deploy

    cfg = load_config("configs/quickstart.yaml", ["data.root", "reid-data"])
    q = deploy.extract_features(cfg, "q.h5", dataset="synthreid", split="query", weights="model.pth.tar-40")
    g = deploy.extract_features(cfg, "g.h5", dataset="synthreid", split="gallery", weights="model.pth.tar-40")
    results = deploy.evaluate_saved(q, g, cfg)            # or deploy.evaluate_files("q.h5", "g.h5")
    deploy.export_model(cfg, "model.onnx", "onnx", weights="model.pth.tar-40")

Command lines: ``scripts/extract.py``, ``scripts/evaluate.py``, ``scripts/export.py``, ``scripts/search.py``
(:func:`torchreid_ext.deploy.search.search`: the people of query images in a folder of crops).
"""
from .errors import DeployInputError, ExportCheckError, FeatureFileError, MissingDependencyError
from .evaluate import evaluate_files, evaluate_saved, format_results
from .export import FORMATS, ExportResult, export_model
from .extract import extract_features
from .saved_features import FeatureSet, load_features, save_features

__all__ = [
    "FORMATS",
    "DeployInputError",
    "ExportCheckError",
    "ExportResult",
    "FeatureFileError",
    "FeatureSet",
    "MissingDependencyError",
    "evaluate_files",
    "evaluate_saved",
    "export_model",
    "extract_features",
    "format_results",
    "load_features",
    "save_features",
]
