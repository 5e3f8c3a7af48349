"""The one PEFT internal surm relies on: a ``SURM`` member added to ``peft.PeftType``, then PEFT's public
``register_peft_method``. These tests fail if a PEFT release changes what the addition depends on."""

from __future__ import annotations

import json
import pickle

import peft
import pytest
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType

import surm
from surm.peft import registration

from .helpers import make_tiny


def test_surm_is_a_real_member_of_the_peft_type_enum():
    member = PeftType.SURM
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member == "SURM" and member.value == "SURM" and member.name == "SURM"
    assert PeftType("SURM") is member and PeftType["SURM"] is member
    assert member in list(PeftType) and "SURM" in PeftType.__members__
    assert pickle.loads(pickle.dumps(member)) is member
    assert json.dumps({"peft_type": member}) == '{"peft_type": "SURM"}'


def test_peft_own_members_are_untouched():
    assert PeftType("LORA") is PeftType.LORA and PeftType.LORA.value == "LORA"
    names = list(PeftType.__members__)
    assert len(names) == len(set(names))


def test_registered_in_every_peft_mapping():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SURM] is surm.SurmConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SURM] is surm.SurmModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SURM] == "surm_"


def test_registration_is_idempotent():
    members_before = list(PeftType.__members__)
    registration.register(surm.SurmConfig, surm.SurmModel)
    registration.register(surm.SurmConfig, surm.SurmModel)
    assert registration._add_peft_type_member("SURM") is PeftType.SURM
    assert list(PeftType.__members__) == members_before


def test_a_saved_config_loads_through_peft_generic_entry_point(tmp_path):
    config = surm.SurmConfig(structure="monarch", nblocks=3, target_modules=["mix"])
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SURM" and saved["structure"] == "monarch" and saved["nblocks"] == 3
    loaded = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, surm.SurmConfig) and loaded.nblocks == 3
    model = peft.get_peft_model(make_tiny(), loaded)
    assert isinstance(model.base_model, surm.SurmModel)


@pytest.mark.parametrize("name", ["LORA", "C3A"])
def test_adding_an_existing_member_returns_peft_own(name):
    assert registration._add_peft_type_member(name) is PeftType[name]
