"""surm: parameter-efficient fine-tuning with structured unrestricted-rank matrices."""

from .insertion import DeltaUpdate, OutputAdapter
from .peft import LayerExport, NotMergeableError, SurmConfig, SurmLayer, SurmModel, export_lora
from .structures import STRUCTURES, StructuredMatrix, structure, structure_options

__version__ = "0.1.0"

__all__ = [
    "STRUCTURES",
    "DeltaUpdate",
    "LayerExport",
    "NotMergeableError",
    "OutputAdapter",
    "StructuredMatrix",
    "SurmConfig",
    "SurmLayer",
    "SurmModel",
    "__version__",
    "export_lora",
    "structure",
    "structure_options",
]
