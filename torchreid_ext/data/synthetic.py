"""SynthReID: a generated, person-like re-ID dataset in Market-1501's layout and protocol.

It is synthetic and exists so that every pipeline here (quick start, tests, CI, the
comparison harness) can train and evaluate end to end without downloads. Numbers on it
say that code works and learns; they say nothing about Market-1501.

Each identity is a fixed outfit (top / bottom / shoe / hair / skin colours from small
palettes, a top pattern, optional bag and hat, body build); the combination identifies
the person, single attributes do not. Each camera has its own colour cast, exposure,
blur and background; each image adds pose (front / back / side), scale and position
jitter, background clutter, partial occlusion, noise and JPEG compression.

Layout (as Market-1501, parsed by Torchreid's own Market1501 code):
``<root>/synthreid/{bounding_box_train,query,bounding_box_test}/PPPP_cCs1_FFFFFF_00.jpg``,
pid 0 = distractors (gallery only), pid -1 = junk (dropped by the loader, as Market's),
queries: one image from each of two cameras per test identity.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import os.path as osp
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..adapter import torchreid

# SyntheticReID and SyntheticReIDSmall are made on first access by the module's __getattr__
__all__ = ["SynthSpec", "generate", "ensure_generated", "dataset_classes",  # noqa: F822
           "SyntheticReID", "SyntheticReIDSmall"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER = "GENERATED.json"

# Palettes (RGB). Several identities share each colour; the combination identifies.
TOPS = [(200, 30, 30), (30, 60, 170), (240, 240, 240), (20, 20, 20), (40, 140, 60),
        (230, 200, 40), (120, 60, 150), (240, 130, 30), (130, 130, 130), (90, 50, 30),
        (60, 180, 200), (230, 120, 160)]
BOTTOMS = [(30, 30, 40), (40, 60, 120), (110, 110, 110), (170, 150, 110), (80, 50, 30),
           (220, 220, 215), (60, 80, 50), (140, 30, 40)]
SHOES = [(20, 20, 20), (235, 235, 235), (110, 70, 40), (180, 30, 30)]
HAIR = [(20, 15, 10), (80, 50, 25), (190, 160, 90), (120, 120, 120)]
SKIN = [(240, 200, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40)]
BAGS = [(20, 20, 20), (140, 80, 40), (200, 30, 30), (40, 60, 150)]
PATTERNS = ("solid", "stripes", "split", "logo")


@dataclass(frozen=True)
class SynthSpec:
    """What to generate. Changing a field regenerates (the marker file records it)."""

    num_train_ids: int = 100
    num_test_ids: int = 100
    num_distractors: int = 100  # pid 0, gallery only
    num_junk: int = 20  # pid -1, dropped by the loader as in Market-1501
    num_cameras: int = 6
    min_cameras: int = 2  # cameras per identity
    max_cameras: int = 4
    min_images: int = 2  # images per identity and camera
    max_images: int = 3
    height: int = 128
    width: int = 64
    seed: int = 0


def _random_identity(rng: np.random.Generator) -> Dict:
    return {
        "top": int(rng.integers(len(TOPS))),
        "top2": int(rng.integers(len(TOPS))),
        "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
        "long_sleeves": bool(rng.random() < 0.5),
        "bottom": int(rng.integers(len(BOTTOMS))),
        "shorts": bool(rng.random() < 0.25),
        "shoes": int(rng.integers(len(SHOES))),
        "hair": int(rng.integers(len(HAIR))),
        "long_hair": bool(rng.random() < 0.35),
        "skin": int(rng.integers(len(SKIN))),
        "bag": int(rng.integers(-1, len(BAGS))),  # -1: no bag
        "bag_side": int(rng.choice([-1, 1])),
        "hat": int(rng.integers(len(TOPS))) if rng.random() < 0.2 else -1,  # -1: no hat
        "build": float(rng.uniform(0.85, 1.15)),  # torso width factor
        "legs": float(rng.uniform(0.92, 1.08)),  # leg length factor
    }


def _random_camera(rng: np.random.Generator, cam: int) -> Dict:
    outdoor = cam % 2 == 0
    return {
        "gain": rng.uniform(0.75, 1.25, size=3).tolist(),  # white balance cast
        "exposure": float(rng.uniform(0.7, 1.25)),
        "gamma": float(rng.uniform(0.8, 1.25)),
        "blur": float(rng.uniform(0.0, 1.1)),
        "wall": (rng.integers(60, 200, size=3) * ([0.7, 1.0, 0.7] if outdoor else 1)).tolist(),
        "floor": rng.integers(40, 160, size=3).tolist(),
        "horizon": float(rng.uniform(0.45, 0.8)),
    }


def _jitter(color, rng, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def _render(person: Dict, camera: Dict, rng: np.random.Generator, spec: SynthSpec,
            show_person: bool = True) -> Image.Image:
    """Draw one crop at 2x and downsample (cheap anti-aliasing)."""
    s = 2
    W, H = spec.width * s, spec.height * s
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    # background: wall/floor split plus clutter
    hz = int(H * (camera["horizon"] + rng.uniform(-0.05, 0.05)))
    d.rectangle([0, 0, W, hz], fill=_jitter(camera["wall"], rng, 25))
    d.rectangle([0, hz, W, H], fill=_jitter(camera["floor"], rng, 25))
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(-W // 4, W), rng.integers(-H // 8, H)
        w, h = rng.integers(W // 8, W // 2), rng.integers(H // 16, H // 3)
        shape = d.ellipse if rng.random() < 0.3 else d.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))

    if show_person:
        view = rng.choice(["front", "back", "side"], p=[0.4, 0.4, 0.2])
        scale = rng.uniform(0.82, 0.98)
        ph = H * scale
        cx = W / 2 + rng.uniform(-0.12, 0.12) * W
        top_y = (H - ph) * rng.uniform(0.1, 0.9)
        u = ph / 100.0  # body unit
        bw = 13 * u * person["build"] * (0.7 if view == "side" else 1.0)  # half torso width
        head_r = 7 * u
        head_cy = top_y + head_r + 1 * u
        neck = head_cy + head_r
        waist = neck + 34 * u
        legs_end = min(waist + 50 * u * person["legs"], top_y + ph - 3 * u)
        skin = _jitter(SKIN[person["skin"]], rng, 8)
        top = _jitter(TOPS[person["top"]], rng)
        bottom = _jitter(BOTTOMS[person["bottom"]], rng)
        # legs, shoes
        leg_w = bw * 0.45
        knee = waist + (legs_end - waist) * 0.5
        for side in (-1, 1):
            lx = cx + side * bw * 0.45
            d.rectangle([lx - leg_w / 2, waist, lx + leg_w / 2, legs_end], fill=bottom)
            if person["shorts"]:
                d.rectangle([lx - leg_w / 2, knee, lx + leg_w / 2, legs_end], fill=skin)
            d.rectangle([lx - leg_w / 2 - u, legs_end - 3 * u, lx + leg_w / 2 + u, legs_end],
                        fill=_jitter(SHOES[person["shoes"]], rng, 8))
        # arms
        arm_color = top if person["long_sleeves"] else skin
        for side in (-1, 1):
            if view == "side" and side == -1:
                continue
            ax = cx + side * (bw + 2.5 * u)
            d.rectangle([ax - 2.5 * u, neck + 2 * u, ax + 2.5 * u, waist + 4 * u], fill=arm_color)
            d.rectangle([ax - 2.5 * u, neck + 2 * u, ax + 2.5 * u, neck + 10 * u], fill=top)
        # torso with pattern
        d.polygon([(cx - bw, neck + 2 * u), (cx + bw, neck + 2 * u),
                   (cx + bw * 0.9, waist), (cx - bw * 0.9, waist)], fill=top)
        top2 = _jitter(TOPS[person["top2"]], rng)
        if person["pattern"] == "stripes":
            for y in np.arange(neck + 6 * u, waist, 7 * u):
                d.rectangle([cx - bw * 0.92, y, cx + bw * 0.92, y + 2.5 * u], fill=top2)
        elif person["pattern"] == "split":
            d.rectangle([cx - bw * 0.9, (neck + waist) / 2, cx + bw * 0.9, waist], fill=top2)
        elif person["pattern"] == "logo" and view == "front":
            d.ellipse([cx - 5 * u, neck + 9 * u, cx + 5 * u, neck + 19 * u], fill=top2)
        # bag: strap across the torso, bag on one side (visible side depends on view)
        if person["bag"] >= 0:
            bag = _jitter(BAGS[person["bag"]], rng, 10)
            side = person["bag_side"] * (-1 if view == "back" else 1)
            bx = cx + side * (bw + 4 * u)
            d.line([(cx - side * bw * 0.8, neck + 3 * u), (bx, waist - 4 * u)], fill=bag,
                   width=max(1, int(2 * u)))
            d.rectangle([bx - 5 * u, waist - 8 * u, bx + 5 * u, waist + 6 * u], fill=bag)
        # head, hair, hat
        d.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=skin)
        hair = _jitter(HAIR[person["hair"]], rng, 8)
        if view == "back":
            d.ellipse([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], fill=hair)
        else:
            d.chord([cx - head_r, head_cy - head_r, cx + head_r, head_cy + head_r], 180, 360,
                    fill=hair)
        if person["long_hair"]:
            d.rectangle([cx - head_r, head_cy, cx + head_r, neck + 8 * u], fill=hair)
            if view != "back":
                d.ellipse([cx - head_r * 0.7, head_cy - head_r * 0.6, cx + head_r * 0.7,
                           head_cy + head_r * 0.9], fill=skin)
        if person["hat"] >= 0:
            d.rectangle([cx - head_r * 1.1, head_cy - head_r * 1.2, cx + head_r * 1.1,
                         head_cy - head_r * 0.3], fill=_jitter(TOPS[person["hat"]], rng, 8))
        # partial occlusion by an object in front (pole, car, another person's body)
        if rng.random() < 0.25:
            occ = tuple(int(v) for v in rng.integers(0, 256, 3))
            kind = rng.integers(3)
            if kind == 0:
                x = rng.uniform(0.1, 0.9) * W
                d.rectangle([x - 0.08 * W, 0, x + 0.08 * W, H], fill=occ)
            elif kind == 1:
                d.rectangle([0, H * rng.uniform(0.65, 0.8), W, H], fill=occ)
            else:
                side = rng.choice([-1, 1])
                x0 = W / 2 + side * W * rng.uniform(0.15, 0.35)
                d.ellipse([x0 - 0.3 * W, H * 0.2, x0 + 0.3 * W, H * 1.2], fill=occ)

    img = img.resize((spec.width, spec.height), Image.BILINEAR)
    if camera["blur"] > 0.2:
        img = img.filter(ImageFilter.GaussianBlur(camera["blur"]))
    a = np.asarray(img, dtype=np.float32) / 255.0
    light = rng.uniform(0.85, 1.15)
    a = a * np.asarray(camera["gain"], dtype=np.float32) * camera["exposure"] * light
    a = np.clip(a, 0, 1) ** camera["gamma"]
    a = a + rng.normal(0, 0.02, size=a.shape).astype(np.float32)
    return Image.fromarray((np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8))


def _name(pid: int, cam: int, frame: int) -> str:
    return f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg" if pid >= 0 else f"-1_c{cam}s1_{frame:06d}_00.jpg"


def generate(out_dir: str, spec: SynthSpec = SynthSpec()) -> Dict[str, int]:
    """Write the dataset into ``out_dir`` (Market-1501 sub-folders); returns image counts."""
    if not (1 <= spec.min_cameras <= spec.max_cameras <= spec.num_cameras <= 6):
        raise ValueError(f"need 1 <= min_cameras <= max_cameras <= num_cameras <= 6, got {spec}")
    if spec.min_cameras < 2:
        raise ValueError("min_cameras must be >= 2: queries and their positives come from different cameras")
    rng = np.random.default_rng(spec.seed)
    cameras = {c: _random_camera(rng, c) for c in range(1, spec.num_cameras + 1)}
    dirs = {k: osp.join(out_dir, k) for k in ("bounding_box_train", "query", "bounding_box_test")}
    for path in dirs.values():
        os.makedirs(path, exist_ok=True)
    counts = {k: 0 for k in dirs}
    frame = 0

    def save(img: Image.Image, subset: str, pid: int, cam: int) -> None:
        nonlocal frame
        frame += 1
        img.save(osp.join(dirs[subset], _name(pid, cam, frame)), quality=90)
        counts[subset] += 1

    total_ids = spec.num_train_ids + spec.num_test_ids
    for pid in range(1, total_ids + 1):
        person = _random_identity(rng)
        n_cams = int(rng.integers(spec.min_cameras, spec.max_cameras + 1))
        cams = sorted(rng.choice(np.arange(1, spec.num_cameras + 1), n_cams, replace=False).tolist())
        shots: List[Tuple[int, Image.Image]] = []
        for cam in cams:
            for _ in range(int(rng.integers(spec.min_images, spec.max_images + 1))):
                shots.append((cam, _render(person, cameras[cam], rng, spec)))
        if pid <= spec.num_train_ids:
            for cam, img in shots:
                save(img, "bounding_box_train", pid, cam)
            continue
        query_cams = set(cams[:: max(1, len(cams) - 1)][:2])  # two distinct cameras
        taken = set()
        for cam, img in shots:
            if cam in query_cams and cam not in taken:
                taken.add(cam)
                save(img, "query", pid, cam)
            else:
                save(img, "bounding_box_test", pid, cam)
    for _ in range(spec.num_distractors):  # unseen people, in the gallery only
        cam = int(rng.integers(1, spec.num_cameras + 1))
        save(_render(_random_identity(rng), cameras[cam], rng, spec), "bounding_box_test", 0, cam)
    for _ in range(spec.num_junk):  # background-only crops, as Market's junk detections
        cam = int(rng.integers(1, spec.num_cameras + 1))
        save(_render({}, cameras[cam], rng, spec, show_person=False), "bounding_box_test", -1, cam)
    return counts


def _marker(spec: SynthSpec) -> Dict:
    return {"generator_version": GENERATOR_VERSION, "spec": asdict(spec)}


def ensure_generated(dataset_dir: str, spec: SynthSpec = SynthSpec()) -> str:
    """Generate into ``dataset_dir`` unless a matching copy is there; returns the data dir.

    Generation goes to a temporary sibling folder renamed into place at the end, so a
    killed run never leaves a half-written dataset behind, and concurrent processes
    (DDP ranks) agree on one copy. A folder without our marker is never touched.
    """
    marker_path = osp.join(dataset_dir, MARKER)
    want = _marker(spec)
    if osp.isdir(dataset_dir):
        if not osp.isfile(marker_path):
            raise RuntimeError(
                f"'{dataset_dir}' exists but was not made by torchreid_ext's generator "
                f"(no {MARKER}); move it away or choose another data.root"
            )
        with open(marker_path) as f:
            found = json.load(f)
        if all(found.get(k) == v for k, v in want.items()):
            return dataset_dir
        stale = tempfile.mkdtemp(prefix=".stale-", dir=osp.dirname(dataset_dir))
        os.replace(dataset_dir, osp.join(stale, "old"))
        shutil.rmtree(stale, ignore_errors=True)
    parent = osp.dirname(osp.abspath(dataset_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".synthreid-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the folder is the dataset's
        logger.info("Generating SynthReID (synthetic, seed %d) into '%s' ...", spec.seed, dataset_dir)
        counts = generate(tmp, spec)
        with open(osp.join(tmp, MARKER), "w") as f:
            json.dump({**want, "counts": counts}, f)
        try:
            os.rename(tmp, dataset_dir)
        except OSError:
            if not osp.isfile(marker_path):  # lost a race to another process: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dataset_dir


def _umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=None)
def dataset_classes() -> Dict[str, type]:
    """``{'synthreid': SyntheticReID, 'synthreid_small': SyntheticReIDSmall}``: Torchreid dataset
    classes, made on first use (they subclass Torchreid's Market1501, which is looked up then,
    not when this module is imported)."""
    market1501 = torchreid().datasets.Market1501

    class SyntheticReID(market1501):
        """Torchreid image dataset ``synthreid``: generated on first use under ``<root>/synthreid``.

        Parsing is Torchreid's own Market-1501 code; only the download step is replaced by
        generation. Lists are sorted so sampling order does not depend on the file system.
        """

        dataset_dir = "synthreid"
        dataset_url = None
        generated = True  # data.checks: nothing to download
        spec = SynthSpec()

        def __init__(self, root: str = "", **kwargs):
            self.root = osp.abspath(osp.expanduser(root))
            self.dataset_dir = ensure_generated(osp.join(self.root, type(self).dataset_dir), self.spec)
            self.data_dir = self.dataset_dir
            self.train_dir = osp.join(self.data_dir, "bounding_box_train")
            self.query_dir = osp.join(self.data_dir, "query")
            self.gallery_dir = osp.join(self.data_dir, "bounding_box_test")
            train = sorted(self.process_dir(self.train_dir, relabel=True))
            query = sorted(self.process_dir(self.query_dir, relabel=False))
            gallery = sorted(self.process_dir(self.gallery_dir, relabel=False))
            kwargs.pop("market1501_500k", None)
            # Skip Market1501.__init__ (it would try to download); go to ImageDataset's.
            super(market1501, self).__init__(train, query, gallery, **kwargs)

    class SyntheticReIDSmall(SyntheticReID):
        """``synthreid_small``: 24 + 24 identities, for smoke tests and CI (seconds per epoch)."""

        dataset_dir = "synthreid_small"
        spec = SynthSpec(num_train_ids=24, num_test_ids=24, num_distractors=20, num_junk=5, seed=1)

    for cls in (SyntheticReID, SyntheticReIDSmall):  # picklable as torchreid_ext.data.synthetic.<name>
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return {"synthreid": SyntheticReID, "synthreid_small": SyntheticReIDSmall}


def __getattr__(name: str):
    """``SyntheticReID`` / ``SyntheticReIDSmall``, made on first access."""
    classes = {cls.__name__: cls for cls in dataset_classes().values()} if name.startswith("Synthetic") else {}
    if name in classes:
        return classes[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
