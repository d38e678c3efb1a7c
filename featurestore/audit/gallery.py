"""The audit's findings shown as items: ``label_issues.png``, the most likely label issues with their images
(image stores) or first words (text stores), each captioned with its path, given label and suggested one. The
previews come from :func:`.page.item_previews` (the store's recorded source); without it, nothing is drawn."""

from __future__ import annotations

import base64
import io
import textwrap
from pathlib import Path

import numpy as np

from ..utils.atomic import atomic_path

GALLERY_ITEMS = 12


def draw_gallery(previews: list[str | None], captions: list[str], out: str | Path, title: str) -> Path | None:
    """A grid of ``previews`` (thumbnail data URIs or text snippets, :mod:`.page`) with ``captions``, as a PNG at
    ``out`` (atomic). Returns ``out``, or None when there is nothing to show."""
    shown = [(preview, caption) for preview, caption in zip(previews, captions, strict=True) if preview]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = not shown[0][0].startswith("data:image")
    columns = 3 if text else 6
    rows = -(-len(shown) // columns)
    cell = (4.2, 1.7) if text else (2.0, 2.45)  # inches per item
    figure, axes = plt.subplots(rows, columns, figsize=(columns * cell[0], rows * cell[1]), dpi=100, squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (preview, caption) in zip(axes.ravel(), shown, strict=False):
        if text:
            axis.text(0, 1, "\n".join(textwrap.wrap(preview, 52)[:8]), va="top", fontsize=7, family="serif",
                      transform=axis.transAxes)
        else:
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1])))
            axis.imshow(np.asarray(image), cmap="gray", interpolation="nearest")
        axis.set_title(caption, fontsize=6.5)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(out)


def issue_captions(rows: np.ndarray, paths: np.ndarray, given: np.ndarray, suggested: np.ndarray,
                   class_names: list[str]) -> list[str]:
    """``<path>\\n<given> → <suggested>?`` for each index of ``rows``."""
    return [f"{paths[row]}\n{class_names[given[row]]} → {class_names[suggested[row]]}?"
            for row in rows]
