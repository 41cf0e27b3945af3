"""regtok: FlexTok-style register tokens that align two modalities on cached frozen-encoder features.

Pure library code (model, losses, training, retrieval, probes). Importing this package must stay cheap:
no torch import here, so that `regtok --help` is instant.
"""

__version__ = "0.1.0"
