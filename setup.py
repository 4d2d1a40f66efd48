"""torchreid-ext: the MSFL/MSGR, DRSL and Support Neighbor papers as Torchreid plug-ins."""
from setuptools import find_packages, setup

# PyPI `torchreid` 0.2.5 declares none of the packages it imports; they are listed here.
TORCHREID_RUNTIME = [
    "opencv-python-headless",  # torchreid.utils.reidtools (rank visualisation)
    "scipy",  # torchreid.data.datasets (CUHK03 .mat files)
    "h5py",  # CUHK03
    "imageio",  # CUHK03
    "gdown",  # pretrained OSNet downloads
    "tb-nightly",  # torch.utils.tensorboard.SummaryWriter in torchreid.engine
    "six",
]

# scripts/export.py (ONNX through torch's torch.export-based exporter, which needs onnxscript;
# onnxruntime checks every exported file). Tested: onnx 1.23.2, onnxruntime 1.32.0, onnxscript 0.7.2
# with torch 2.14.1. The test extra includes them, so CI runs the export parity tests.
DEPLOY = ["onnx", "onnxruntime", "onnxscript"]

# knn.backend faiss-flat / faiss-ivf / faiss-hnsw (torchreid_ext.metrics.knn_index): CPU faiss. A wheel of
# 18 MB with no dependency beyond numpy and packaging (tested: faiss-cpu 1.15.1), so the test extra has it
# too and CI runs the faiss tests (they skip where it is absent).
FAISS = ["faiss-cpu"]

setup(
    name="torchreid-ext",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torchreid_ext", "torchreid_ext.*"]),
    python_requires=">=3.9",
    install_requires=[
        # torch and torchvision are resolved from the registry (see README): the registry's
        # torchvision wheels are built against its newest torch.
        "torch>=2.6",  # weights-only loading by default and torch.serialization.safe_globals
        "torchvision",
        "torchreid==0.2.5",
        "numpy",
        "Pillow",
        "PyYAML",
        "yacs",
        "matplotlib",
        "tqdm",
        *TORCHREID_RUNTIME,
    ],
    # pytest-xdist: the suite runs in two worker processes (pytest.ini), one torch thread each;
    # ruff: the linter CI runs before the tests (.ci/run; settings in pyproject.toml)
    extras_require={"deploy": DEPLOY, "faiss": FAISS,
                    "test": ["pytest>=7", "pytest-timeout", "pytest-xdist", "ruff", *DEPLOY, *FAISS]},
    # one console command per script (scripts/*.py are thin wrappers of the same functions)
    entry_points={"console_scripts": [
        "torchreid-ext=torchreid_ext.cli:main",  # train / evaluate (scripts/main.py)
        "torchreid-ext-compare=torchreid_ext.experiments.compare:main",
        "torchreid-ext-extract=torchreid_ext.deploy.commands:extract_main",
        "torchreid-ext-evaluate=torchreid_ext.deploy.commands:evaluate_main",
        "torchreid-ext-export=torchreid_ext.deploy.commands:export_main",
        "torchreid-ext-search=torchreid_ext.deploy.commands:search_main",
        "torchreid-ext-visualize=torchreid_ext.experiments.ranks:main",
    ]},
)
