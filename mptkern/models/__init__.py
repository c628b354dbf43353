from .default import load_default

__all__ = ["load_default"]
