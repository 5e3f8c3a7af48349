"""The one place surm touches PEFT internals: adding ``SURM`` to ``peft.PeftType`` and registering the method.

PEFT's public hook ``peft.utils.register_peft_method`` accepts only names that are already members of the
``PeftType`` enum, and that enum is closed. So we add one member, ``PeftType.SURM == "SURM"``, through the
enum's member tables (the same effect a ``PeftType.SURM = "SURM"`` line in PEFT would have), then call the
public hook. Everything else — ``get_peft_model``, ``PeftModel.from_pretrained``, save/load of
``adapter_model.safetensors`` — is PEFT's own code, keyed by that member. Tested in
``tests/peft/test_registration.py``.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

SURM_NAME = "surm"


def _add_peft_type_member(name: str) -> PeftType:
    """Return ``PeftType[name]``, adding it to the enum first if this PEFT version lacks it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    # EnumType.__setattr__ refuses to rebind members; the class attribute is set through type's own setattr.
    type.__setattr__(PeftType, name, member)
    return member


SURM_PEFT_TYPE: PeftType = _add_peft_type_member(SURM_NAME.upper())


def register(config_cls: type, model_cls: type) -> None:
    """Register surm's config and tuner classes with PEFT under the name ``surm`` (idempotent)."""
    if SURM_PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=SURM_NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
