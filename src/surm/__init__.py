"""surm: parameter-efficient fine-tuning with structured unrestricted-rank matrices."""

from .structures import STRUCTURES, StructuredMatrix, structure, structure_options

__version__ = "0.1.0"

__all__ = ["STRUCTURES", "StructuredMatrix", "__version__", "structure", "structure_options"]
