"""Names of the classes a class-to-image checkpoint was trained on, for the demo's class picker.

The 1000 ImageNet-1k names come from the metadata that timm installs (WordNet lemmas in the standard
synset order, so name i is class label i); nothing is downloaded. A checkpoint with another class count
(our tiny ones) gets plain "class 0" .. "class N-1": its labels are not ImageNet's first N classes.
"""

from __future__ import annotations

import functools

IMAGENET_NUM_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index = class label (e.g. 207 -> "golden retriever")."""
    try:
        from timm.data import ImageNetInfo
    except ImportError as e:  # timm is a dependency of the package; say what is missing if it is not there
        raise ImportError(f"ImageNet class names come from timm's metadata; pip install timm ({e})") from None
    info = ImageNetInfo("imagenet-1k")
    names = tuple(info.index_to_description(i) for i in range(info.num_classes()))
    if len(names) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"timm's ImageNet-1k metadata has {len(names)} classes, expected {IMAGENET_NUM_CLASSES}")
    return names


def class_names(num_classes: int) -> list[str]:
    """One display name per label 0..num_classes-1: ImageNet's names for a 1000-class model, else "class i"."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 for a class-to-image model, got {num_classes}")
    if num_classes == IMAGENET_NUM_CLASSES:
        return list(imagenet_class_names())
    return [f"class {i}" for i in range(num_classes)]
