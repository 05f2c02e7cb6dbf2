"""ptft-dist: pre-train, then fine-tune BERT-style encoders."""

__version__ = "0.1.0"
