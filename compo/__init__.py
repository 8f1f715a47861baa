"""compo: preference alignment on noisy labels (clean/noisy split, DPO/BCO/KTO, ComPO)."""

__version__ = "0.1.0"
