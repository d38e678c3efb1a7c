"""Encoders: from an item (an image file, a document) to the model's input and through a frozen backbone.

Decoding and preprocessing (:mod:`.images`, :mod:`.preprocess`, :mod:`.texts`), the backbones
(:mod:`.backbones`), the engines that run them (eager torch, onnxruntime: :mod:`.engines`, :mod:`.text_engines`,
:mod:`.runtime`), the interface extraction runs (:mod:`.encoders`) and the fingerprint of what they compute.
"""

from .encoders import Encoder, ImageEncoder, Item, Runner, view_id
from .engines import make_engine
from .fingerprint import changed_keys, fingerprint_for
from .images import DecodedImages, collate_decoded, load_image, load_rgb
from .preprocess import Preprocessing
from .runtime import make_session
from .texts import TextEncoder, Tokenizer, item_text, read_text

__all__ = [
    "Encoder",
    "ImageEncoder",
    "Item",
    "Runner",
    "view_id",
    "make_engine",
    "changed_keys",
    "fingerprint_for",
    "DecodedImages",
    "collate_decoded",
    "load_image",
    "load_rgb",
    "Preprocessing",
    "make_session",
    "TextEncoder",
    "Tokenizer",
    "item_text",
    "read_text",
]
