"""wsi-embed: whole-slide images to patch embeddings and slide-level predictions."""

__version__ = "0.1.0"
