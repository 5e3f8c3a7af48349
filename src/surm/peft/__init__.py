"""surm as a Hugging Face PEFT method: ``peft.get_peft_model(model, SurmConfig(...))``."""

from .config import SurmConfig
from .export import LayerExport, export_lora
from .layer import NotMergeableError, SurmLayer
from .model import SurmModel
from .registration import SURM_PEFT_TYPE, register

register(SurmConfig, SurmModel)

__all__ = [
    "SURM_PEFT_TYPE",
    "LayerExport",
    "NotMergeableError",
    "SurmConfig",
    "SurmLayer",
    "SurmModel",
    "export_lora",
]
