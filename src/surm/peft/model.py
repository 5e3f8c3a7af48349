"""SurmModel: the PEFT tuner that finds target modules and wraps them in SurmLayer."""

from __future__ import annotations

import re
from typing import Any, Optional

from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import SurmConfig
from .layer import NotMergeableError, SurmLayer

#: Default Adapter placement (Houlsby, as in SURM): after the attention-output dense and the FFN-output dense.
#: In BERT-like models both end in "output.dense" and PEFT matches suffixes.
ADAPTER_MODE_TARGET_MODULES = {
    name: ["output.dense"] for name in ("bert", "roberta", "xlm-roberta", "camembert", "electra", "mpnet", "data2vec-text")
}


class SurmModel(BaseTuner):
    """Attaches surm adapters (see :class:`~surm.peft.config.SurmConfig`) to a model; created by ``get_peft_model``."""

    prefix: str = "surm_"
    tuner_layer_cls = SurmLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SurmConfig, model_config: dict) -> SurmConfig:
        if peft_config.target_modules is not None:
            return peft_config
        model_type = model_config.get("model_type")
        defaults = self.target_module_mapping if peft_config.mode == "delta" else ADAPTER_MODE_TARGET_MODULES
        if model_type not in defaults:
            raise ValueError(
                f"SurmConfig(mode={peft_config.mode!r}) has no default target_modules for model_type={model_type!r}; "
                "pass target_modules (module names, a regex or 'all-linear')"
            )
        peft_config.target_modules = set(defaults[model_type])
        return peft_config

    def _create_and_replace(
        self,
        peft_config: SurmConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: Optional[str] = None,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must be the module's full name")
        settings = peft_config.resolve(current_key)
        try:
            if isinstance(target, SurmLayer):
                target.update_layer(adapter_name, peft_config, settings)
                return
            new_module = SurmLayer(target, adapter_name, peft_config, settings)
        except (TypeError, ValueError) as error:
            raise type(error)(f"cannot add surm adapter {adapter_name!r} to {current_key!r}: {error}") from error
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Checkpoint key of a model key: ``...surm_delta.<adapter>.matrix.column`` -> ``...surm_delta.matrix.column``.

        PEFT's default only strips the adapter name from the last two segments; surm's adapters are modules with
        nested parameters, so the name sits right after the container. Used for both saving and loading.
        """
        pattern = rf"(^|\.)({'|'.join(SurmLayer.adapter_layer_names)})\.{re.escape(adapter_name)}\."
        stripped, count = re.subn(pattern, r"\1\2.", key, count=1)
        return stripped if count else super()._remove_adapter_name_from_key(key, adapter_name)

    def _check_mergeable(self, adapter_names: Optional[list[str]]) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        adapter_mode = [n for n in names if n in self.peft_config and self.peft_config[n].mode == "adapter"]
        if adapter_mode:
            raise NotMergeableError(
                f"adapter(s) {adapter_mode} are in mode 'adapter' (h + act(S h), non-linear) and cannot be merged; "
                "use unload() to remove them or disable_adapter() to bypass them"
            )

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ):
        if merge:
            self._check_mergeable(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
