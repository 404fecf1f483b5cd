"""Training data: ImageNet-style folders, image-caption folders and a built-in synthetic dataset.

Every random choice (sample order, crops, flips) is a function of (seed, epoch, index), so a resumed run
sees exactly the batches the interrupted run would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from (seed, keys...), e.g. (seed, epoch): distinct tuples give unrelated streams
    (a plain seed + epoch would give seed 42's second epoch the order of seed 43's first)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]) >> 1


def sample_generator(seed: int, *keys: int) -> np.random.Generator:
    """An independent numpy generator for (seed, keys...), e.g. (seed, epoch, index)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, *[k & 0xFFFFFFFF for k in keys]])


# ---------------------------------------------------------------------------- preprocessing
def center_crop_arr(image: Image.Image, size: int) -> Image.Image:
    """ADM's center crop: BOX-halve while the short side is >= 2 size, BICUBIC to size, center crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top: top + size, left: left + size])


def resize_random_crop(image: Image.Image, size: int, expand_ratio: float, rng: np.random.Generator) -> Image.Image:
    """Resize the short side to round(size * expand_ratio) with LANCZOS, then crop size x size at random."""
    short = round(size * expand_ratio)
    w, h = image.size
    if w <= h:
        new = (short, max(short, int(short * h / w)))
    else:
        new = (max(short, int(short * w / h)), short)
    image = image.resize(new, resample=Image.LANCZOS)
    top = int(rng.integers(0, new[1] - size + 1))
    left = int(rng.integers(0, new[0] - size + 1))
    return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB. PIL's own convert clips 16-bit and 32-bit grey to 255 (white) and float
    images to black, so those are rescaled first, by mode: integer grey ("I;16*", and "I", which older Pillow
    gives 16-bit PNGs) is taken as 16-bit, divided by 257; float grey ("F") as [0, 1], times 255."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        scale = 255.0 if image.mode == "F" else 1 / 257
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64) * scale)
        image = Image.fromarray(arr.round().clip(0, 255).astype(np.uint8))
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)


class Preprocess:
    """The release's two preprocessings, each followed by a horizontal flip with probability 0.5."""

    def __init__(self, resolution: int, center_crop: bool = True, expand_ratio: float = 1.125):
        if not center_crop and expand_ratio < 1:
            raise ValueError(f"data.expand_ratio={expand_ratio} must be >= 1 for the random crop")
        self.resolution, self.center_crop, self.expand_ratio = resolution, center_crop, expand_ratio

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        image = to_rgb(image)
        if self.center_crop:
            image = center_crop_arr(image, self.resolution)
        else:
            image = resize_random_crop(image, self.resolution, self.expand_ratio, rng)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(image)


# ---------------------------------------------------------------------------- datasets
class EpochDataset(Dataset):
    """A dataset whose items take (index, epoch): the loader passes (index, epoch) pairs."""

    seed: int = 0
    samples: list = []

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        return self.get(index, sample_generator(self.seed, epoch, index))

    def get(self, index: int, rng: np.random.Generator):
        raise NotImplementedError

    def read_image(self, path: str, rng: np.random.Generator, **fields) -> dict:
        """{"image": preprocessed image, **fields}, or {"skipped": reason} for a file that will not decode:
        a corrupt file must not stop a multi-day run."""
        try:
            with Image.open(path) as image:
                return {"image": self.preprocess(image, rng), **fields}
        except Exception as e:
            return {"skipped": f"{path}: {type(e).__name__}: {e}"}


class ImageFolderDataset(EpochDataset):
    """root/<class name>/<image>: labels are the sorted class folders' positions (as torchvision's)."""

    def __init__(self, root: str | os.PathLike, preprocess: Preprocess, seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data.root={str(root)!r} does not exist or is not a folder")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.samples: list[tuple[str, int]] = []
        empty = []
        for label, name in enumerate(self.classes):
            count = len(self.samples)
            walk = []
            for dirpath, dirs, files in os.walk(root / name, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]  # .ipynb_checkpoints, .thumbnails: copies
                walk.append((dirpath, files))
            for dirpath, files in sorted(walk):
                for f in sorted(files):  # macOS "._x.jpg" files are metadata, not images
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                        self.samples.append((os.path.join(dirpath, f), label))
            if len(self.samples) == count:
                empty.append(name)
        if self.samples and empty:
            raise ValueError(f"data.root={str(root)!r}: class folders {empty[:5]}{' ...' if len(empty) > 5 else ''} "
                             f"hold no images ({len(empty)} of {len(self.classes)}); every class folder takes a "
                             f"label, so remove the empty ones or add images with one of {IMAGE_EXTENSIONS}")
        if not self.samples:
            raise ValueError(f"data.root={str(root)!r} holds no images: expected root/<class>/<image> with one of "
                             f"{IMAGE_EXTENSIONS}")
        self.preprocess, self.seed = preprocess, seed

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def get(self, index, rng):
        path, label = self.samples[index]
        return self.read_image(path, rng, label=label)


class CaptionDataset(EpochDataset):
    """root/<images> with a JSON-lines captions file: {"file": "<path relative to root>", "caption": "..."}."""

    def __init__(self, root: str | os.PathLike, captions_file: str, preprocess: Preprocess, seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data.root={str(root)!r} does not exist or is not a folder")
        path = Path(captions_file) if Path(captions_file).is_absolute() else root / captions_file
        if not path.is_file():
            raise ValueError(f"captions file {str(path)!r} does not exist (data.captions_file={captions_file!r}); "
                             'expected JSON lines {"file": ..., "caption": ...}')
        self.samples: list[tuple[str, str]] = []
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) allowed
        except UnicodeDecodeError as e:
            raise ValueError(f"captions file {str(path)!r} is not UTF-8 text ({e})") from None
        for line_number, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                file, caption = row["file"], row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_number}: expected {{\"file\": ..., \"caption\": ...}}, "
                                 f"got {line.strip()[:200]!r} ({e})") from None
            if not isinstance(caption, str):
                raise ValueError(f"{path}:{line_number}: caption must be a string, got {caption!r}")
            if not isinstance(file, str) or not file:
                raise ValueError(f"{path}:{line_number}: file must be an image path (a string), got {file!r}")
            image_path = root / file
            if not image_path.is_file():
                raise ValueError(f"{path}:{line_number}: image {file!r} does not exist under {str(root)!r}")
            self.samples.append((str(image_path), caption))
        if not self.samples:
            raise ValueError(f"captions file {str(path)!r} has no rows")
        self.preprocess, self.seed = preprocess, seed

    def get(self, index, rng):
        path, caption = self.samples[index]
        return self.read_image(path, rng, caption=caption, index=index)


SYNTHETIC_COLOURS = [(220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 40),
                     (200, 60, 200), (40, 200, 210), (240, 140, 30), (240, 240, 240)]
SYNTHETIC_SHAPES = ["disc", "square", "triangle", "ring", "cross", "diamond", "bar", "dot"]
SYNTHETIC_COLOUR_NAMES = ["red", "green", "blue", "yellow", "purple", "cyan", "orange", "white"]


class SyntheticShapes(EpochDataset):
    """Built-in procedural classes: class c is a shape of colour c on a dark background with jittered size,
    position and brightness. Needs no files; a tiny model learns it in minutes on a CPU."""

    def __init__(self, resolution: int, num_classes: int = 4, size: int = 4096, seed: int = 0):
        if not 1 <= num_classes <= len(SYNTHETIC_COLOURS):
            raise ValueError(f"data.synthetic_classes={num_classes} must be in [1, {len(SYNTHETIC_COLOURS)}]")
        self.resolution, self.num_classes, self.size, self.seed = resolution, num_classes, size, seed
        self.classes = [f"{SYNTHETIC_COLOUR_NAMES[c]} {SYNTHETIC_SHAPES[c]}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.size

    def get(self, index, rng):
        label = index % self.num_classes
        return {"image": to_tensor(draw_shape(label, self.resolution, rng)), "label": label}


def draw_shape(label: int, resolution: int, rng: np.random.Generator) -> Image.Image:
    r = resolution
    background = tuple(int(v) for v in rng.integers(10, 50, size=3))
    image = Image.new("RGB", (r, r), background)
    draw = ImageDraw.Draw(image)
    shade = rng.uniform(0.8, 1.0)
    colour = tuple(int(c * shade) for c in SYNTHETIC_COLOURS[label])
    half = r * rng.uniform(0.25, 0.38)
    cx, cy = r / 2 + rng.uniform(-0.12, 0.12) * r, r / 2 + rng.uniform(-0.12, 0.12) * r
    box = (cx - half, cy - half, cx + half, cy + half)
    shape = SYNTHETIC_SHAPES[label]
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(2, r // 10))
    elif shape == "cross":
        w = half / 3
        draw.rectangle((cx - w, cy - half, cx + w, cy + half), fill=colour)
        draw.rectangle((cx - half, cy - w, cx + half, cy + w), fill=colour)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    elif shape == "bar":
        draw.rectangle((cx - half, cy - half / 3, cx + half, cy + half / 3), fill=colour)
    else:
        draw.ellipse((cx - half / 2, cy - half / 2, cx + half / 2, cy + half / 2), fill=colour)
    return image


# ---------------------------------------------------------------------------- sampling order
# How an epoch's order is drawn; saved with each training checkpoint, so a resume can tell an older scheme.
DATA_ORDER = "torch.randperm(derive_seed(seed, epoch))"


class ResumableShardSampler(Sampler):
    """Per-epoch permutation from (seed, epoch), cut into world_size shards (rank r takes every
    world_size-th index), whole batches only, starting at a given batch of the epoch.

    Yields (index, epoch) pairs for EpochDataset.
    """

    def __init__(self, dataset_size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch < 1:
            raise ValueError(f"the dataset has {dataset_size} images: too few for one batch of {batch_size} on each "
                             f"of {world_size} processes")

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.dataset_size, generator=generator)
        usable = self.batches_per_epoch * self.batch_size * self.world_size
        shard = order[:usable][self.rank::self.world_size]
        for index in shard[self.start_batch * self.batch_size:].tolist():
            yield (index, self.epoch)


def gather_examples(examples: list[dict]) -> dict:
    """DataLoader collate: stack the readable images, count the skipped ones (collate_fn, worker side)."""
    kept = [e for e in examples if "skipped" not in e]
    batch = {"skipped": [e["skipped"] for e in examples if "skipped" in e]}
    if kept:
        batch["images"] = torch.stack([e["image"] for e in kept])
        if "label" in kept[0]:
            batch["labels"] = torch.tensor([e["label"] for e in kept], dtype=torch.long)
        if "caption" in kept[0]:
            batch["captions"] = [e["caption"] for e in kept]
            batch["indices"] = torch.tensor([e["index"] for e in kept], dtype=torch.long)
    return batch


def build_dataset(config, seed: int) -> EpochDataset:
    data = config.data
    if data.name == "synthetic":
        return SyntheticShapes(data.resolution, data.synthetic_classes, data.synthetic_size, seed=seed)
    preprocess = Preprocess(data.resolution, bool(data.center_crop), float(data.expand_ratio))
    if data.name == "captions":
        return CaptionDataset(data.root, data.captions_file, preprocess, seed=seed)
    return ImageFolderDataset(data.root, preprocess, seed=seed)


def write_synthetic_captions(root: str | os.PathLike, count: int = 512, resolution: int = 32, classes: int = 4,
                             seed: int = 0) -> Path:
    """Write an image-caption folder of synthetic shapes: root/images/NNNNNN.png and root/captions.jsonl with
    captions such as "a red disc". For trying text-to-image training without a dataset."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        label = i % classes
        image = draw_shape(label, resolution, sample_generator(seed, 0, i))
        name = f"images/{i:06d}.png"
        image.save(root / name)
        rows.append(json.dumps({"file": name, "caption": f"a {SYNTHETIC_COLOUR_NAMES[label]} {SYNTHETIC_SHAPES[label]}"}))
    (root / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return root


def image_grid(images: np.ndarray, columns: int) -> Image.Image:
    """(N, H, W, 3) uint8 -> one PIL image, `columns` per row, 2-pixel gaps."""
    n, h, w, _ = images.shape
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + c * (w + 2): 2 + c * (w + 2) + w] = img
    return Image.fromarray(grid)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pixelflow.data",
                                     description="Write a synthetic image-caption folder for text-to-image training "
                                                 "(coloured shapes captioned e.g. 'a red disc'; see "
                                                 "configs/tiny_t2i.yaml).")
    parser.add_argument("root", help="folder to create (images/ and captions.jsonl)")
    parser.add_argument("--count", type=int, default=512, help="images to write (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=32, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=4,
                        help=f"shape-and-colour kinds, at most {len(SYNTHETIC_SHAPES)} (default: %(default)s)")
    args = parser.parse_args()
    root = write_synthetic_captions(args.root, args.count, args.resolution, args.classes)
    print(f"wrote {args.count} images of {args.resolution} px and their captions to {root}")
