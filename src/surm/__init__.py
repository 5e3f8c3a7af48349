"""surm: parameter-efficient fine-tuning with structured unrestricted-rank matrices."""

import logging

# PEFT imports bitsandbytes where it is installed; on CPUs with AVX512-BF16 its CPU backend then logs, in every
# process, that an optional kernel package is missing and that it falls back to its own kernel. That is not an error
# of the user's, and it would break surm's one-line errors; real failures of bitsandbytes still raise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .insertion import DeltaUpdate, OutputAdapter
from .peft import LayerExport, NotMergeableError, SurmConfig, SurmLayer, SurmModel, export_lora
from .recommendation import recommend
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
    "recommend",
    "structure",
    "structure_options",
]
