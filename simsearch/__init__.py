"""simsearch: self-hosted image search with its own SimCLR-trained encoder."""

__version__ = "0.1.0"
