"""surm: parameter-efficient fine-tuning with structured unrestricted-rank matrices."""

from .insertion import DeltaUpdate, OutputAdapter
from .peft import NotMergeableError, SurmConfig, SurmLayer, SurmModel
from .structures import STRUCTURES, StructuredMatrix, structure, structure_options

__version__ = "0.1.0"

__all__ = [
    "STRUCTURES",
    "DeltaUpdate",
    "NotMergeableError",
    "OutputAdapter",
    "StructuredMatrix",
    "SurmConfig",
    "SurmLayer",
    "SurmModel",
    "__version__",
    "structure",
    "structure_options",
]
