"""Captions of the training images, for the `text` reference (paper §4, Tab. 1: text embeddings of captions).

Neither dataset here comes with captions, so each image gets one built from what is known about it: its
*subject*, one of `TEMPLATES` drawn per image by a seeded generator around it ("a dark photo of the small
red star on a striped blue background."). The subject is what the dataset can say about that image: for the
embedded shapes, its size, colours, background and class (`shapes_dataset.describe`, re-drawn from the seeds
that rendered it), so that, like the paper's per-image captions, the text distribution spreads over thousands
of points; for CIFAR-10 and an ImageFolder, only its class name (at most len(TEMPLATES) points per class).
Class names come from the dataset (`ImageData.class_names`: the shapes' and CIFAR-10's names, an
ImageFolder's folder names) or from a file of one name per line (`load_class_names`; for ImageNet, whose
folders are WordNet ids, a list of readable names). Underscores read as spaces ("striped_square").
Captions depend only on (labels, subjects or class names, seed): notebook 40 rebuilds exactly the captions
notebook 30 fitted its teacher on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

# {a}: the subject with its article ("a star", "an ellipse"); {name}: the bare subject
TEMPLATES: tuple[str, ...] = (
    "{a}.", "a photo of {a}.", "a picture of {a}.", "an image of {a}.", "a drawing of {a}.",
    "a rendering of {a}.", "a sketch of {a}.", "a painting of {a}.", "a close-up photo of {a}.",
    "a good photo of {a}.", "a cropped photo of the {name}.", "a low resolution photo of the {name}.",
    "a bright photo of the {name}.", "a dark photo of the {name}.", "a blurry photo of the {name}.",
    "a pixelated photo of the {name}.",
)


def readable(name: str) -> str:
    """A class name as caption text: underscores as spaces, surrounding blanks dropped."""
    return " ".join(name.replace("_", " ").split())


def with_article(name: str) -> str:
    """'an ellipse', 'a star' (by the first letter: enough for these subjects)."""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def captions(labels: Tensor, class_names: Sequence[str], generator: torch.Generator,
             subjects: Sequence[str] = ()) -> list[str]:
    """One caption per label (N,): `TEMPLATES`[k] around the image's subject, k drawn from `generator`.

    Args:
        subjects: a phrase per training instance, each naming its class (rows N' … of a flipped latent cache,
            N = m·N', repeat them); empty: the label's class name.

    Raises:
        ValueError: a label outside `class_names`, subjects that do not tile the labels, or a subject that
            does not name its label's class.
    """
    labels = labels.long().cpu()
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(class_names)):
        raise ValueError(f"labels span {int(labels.min())}..{int(labels.max())} but there are "
                         f"{len(class_names)} class names")
    names = [readable(n) for n in class_names]
    phrases = [names[y] for y in labels.tolist()]
    if subjects:
        if len(labels) % len(subjects):
            raise ValueError(f"{len(subjects)} subjects do not tile {len(labels)} labels")
        phrases = [subjects[i % len(subjects)] for i in range(len(labels))]
        wrong = next((i for i, (p, y) in enumerate(zip(phrases, labels.tolist())) if names[y] not in p), None)
        if wrong is not None:
            raise ValueError(f"subject {wrong} ({phrases[wrong]!r}) does not name its class "
                             f"{names[labels[wrong]]!r}: subjects and labels are out of step")
    picks = torch.randint(len(TEMPLATES), (len(labels),), generator=generator).tolist()
    return [TEMPLATES[k].format(a=with_article(p), name=p) for p, k in zip(phrases, picks)]


def load_class_names(path: str | Path, num_classes: int, *, key: str = "reference.text_class_names"
                     ) -> tuple[str, ...]:
    """The non-blank lines of the UTF-8 file `path`, one class name per label in label order.

    Raises:
        ValueError: the file is missing or holds fewer names than `num_classes` (the message names `key`).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{key}={str(path)!r}: no such file (one class name per line, in label order)")
    names = tuple(line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip())
    if len(names) < num_classes:
        raise ValueError(f"{key}={str(path)!r} holds {len(names)} names; the labels need {num_classes} "
                         "(one per line, in label order)")
    return names
