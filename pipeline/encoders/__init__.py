"""Shared by extract and embed: frozen image encoders named by specs, each with its own preprocessing.

Reads: weights files, named by a spec (``open_clip:``, ``timm:``, ``tvl:``, ``tiny``) or found in the local
Hugging Face cache; loaded without running pickled code. Writes nothing.

- ``encoder.py``: specs and :func:`load_encoder`, the entry point (an :class:`Encoder`: uint8 images → pooled
  and token features).
- ``kinds.py``: one registered builder per kind and form of spec; ``checkpoints.py``: safe checkpoint reading;
  ``hub.py``: the Hugging Face cache; ``images.py``: decoding and each encoder's preprocessing.

Imports nothing from a stage.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "encoder": ("Encoder", "EncoderSpec", "absolute_spec", "load_encoder", "parse_spec"),
})
