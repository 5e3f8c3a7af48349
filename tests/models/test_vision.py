"""EfficientNet-Lite0 for image datasets: offline pretrained loading, collate, surm adapters on 1x1 convs, a run."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import surm  # noqa: E402
from surm.data import DatasetSplits, TextExample, load_dataset  # noqa: E402
from surm.methods import MethodChoice, build_peft_config  # noqa: E402
from surm.models import load_model  # noqa: E402
from surm.commands.finetune import RESULTS, Run, RunConfig, finetune  # noqa: E402
from surm.settings import RunSettings  # noqa: E402
from surm.models.vision import (  # noqa: E402
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VISION_DEFAULT_TARGETS,
    load_image_classifier,
)

#: mean |w| of the stem convolution in efficientnet-lite0-57934424.pth (the ImageNet weights).
STEM_ABS_MEAN = 0.4481


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    return load_dataset("digits")


@pytest.fixture
def loaded(digits):
    torch.manual_seed(0)
    return load_model("efficientnet-lite0", digits)


def test_pretrained_weights_load_offline(loaded, digits):
    from efficientnet_lite_pytorch import EfficientNet

    backbone = loaded.model.backbone
    assert backbone._conv_stem.weight.abs().mean().item() == pytest.approx(STEM_ABS_MEAN, abs=1e-4)
    assert loaded.task_type is None and loaded.head == ["classifier"]
    assert loaded.model.classifier.out_features == digits.num_labels
    random = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE_SIZE).eval()
    reference = EfficientNet.from_name("efficientnet-lite0", image_size=IMAGE_SIZE)
    reference.load_state_dict(torch.load(loaded.source, map_location="cpu", weights_only=True))
    x = loaded.collate(digits.train[:4])["pixel_values"]
    with torch.no_grad():
        features = backbone.eval().extract_features(x)
        assert not torch.allclose(features, random.extract_features(x), atol=1e-3)
        # plain 1x1 convolutions in place of the package's padded ones change nothing
        torch.testing.assert_close(features, reference.eval().extract_features(x))


def test_collate_and_forward_give_logits(loaded, digits):
    batch = loaded.collate(digits.train[:8])
    assert batch["pixel_values"].shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch["labels"].tolist() == [e.label for e in digits.train[:8]]
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = loaded.model.eval()(**batch)
    assert logits.shape == (len(labels), digits.num_labels) and torch.isfinite(logits).all()
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    corner = batch["pixel_values"][:, :, 0, 0]  # digits images have black corners
    assert torch.allclose(corner, black.expand_as(corner), atol=1e-5)


def test_default_targets_are_pointwise_convolutions(loaded):
    matched = [m for n, m in loaded.model.named_modules() if n.split(".")[-1] in VISION_DEFAULT_TARGETS]
    assert len(matched) == 31
    assert all(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1 for m in matched)
    assert loaded.default_targets == VISION_DEFAULT_TARGETS


@pytest.mark.slow
def test_monarch_step_updates_only_adapters_and_head(loaded, digits):
    config = surm.SurmConfig(structure="monarch", target_modules=VISION_DEFAULT_TARGETS, modules_to_save=["classifier"])
    model = peft.get_peft_model(loaded.model, config)
    assert sum(isinstance(m, surm.SurmLayer) for m in model.modules()) == 31
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("surm_delta" in n or "modules_to_save" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = loaded.collate(digits.train[:16])
    labels = batch.pop("labels")
    nn.functional.cross_entropy(model(**batch), labels).backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed <= trainable  # frozen weights and BatchNorm running statistics stay put
    assert any("surm_delta" in k for k in changed) and any("modules_to_save" in k for k in changed)


def test_lora_wraps_the_pointwise_convolutions(loaded, digits):
    config = peft.LoraConfig(r=4, target_modules=VISION_DEFAULT_TARGETS, modules_to_save=["classifier"])
    model = peft.get_peft_model(loaded.model, config)
    batch = loaded.collate(digits.train[:4])
    batch.pop("labels")
    with torch.no_grad():
        assert model.eval()(**batch).shape == (4, digits.num_labels)


def test_model_and_data_kinds_must_match(digits):
    with pytest.raises(ValueError, match="supported image models: efficientnet-lite0"):
        load_model("minilm", digits)
    with pytest.raises(ValueError, match="'resnet50'.*efficientnet-lite0"):
        load_image_classifier("resnet50", digits)
    text = DatasetSplits("toy", "text", ("a", "b"), [TextExample("x", 0), TextExample("y", 1)], [], [])
    with pytest.raises(ValueError, match="'efficientnet-lite0' is an image model.*'toy'"):
        load_model("efficientnet-lite0", text)


def test_default_targets_follow_the_model():
    text = build_peft_config(MethodChoice("circulant"), "SEQ_CLS", ["classifier"])
    assert text.target_modules == {"query", "value"}
    adapter = build_peft_config(MethodChoice("circulant", mode="adapter"), "SEQ_CLS", ["classifier"])
    assert adapter.target_modules == {"output.dense"}
    image = build_peft_config(MethodChoice("circulant"), None, ["classifier"], VISION_DEFAULT_TARGETS)
    assert image.target_modules == set(VISION_DEFAULT_TARGETS) and image.modules_to_save == ["classifier"]
    chosen = build_peft_config(MethodChoice("circulant", targets=["_conv_head"]), None, ["classifier"],
                               VISION_DEFAULT_TARGETS)
    assert chosen.target_modules == {"_conv_head"}


def test_run_picks_vision_targets(tmp_path):
    run = Run(RunConfig(method=MethodChoice("lowrank"), output=tmp_path / "out", settings=RunSettings(
        model="efficientnet-lite0", dataset="digits", train_size=8, eval_size=8, device="cpu")))
    assert run.peft_config.target_modules == set(VISION_DEFAULT_TARGETS)


@pytest.mark.slow
def test_finetune_end_to_end(tmp_path):
    config = RunConfig(method=MethodChoice("circulant", targets=VISION_DEFAULT_TARGETS), output=tmp_path / "out",
                       settings=RunSettings(model="efficientnet-lite0", dataset="digits", epochs=1, train_size=64,
                                            eval_size=64, batch_size=32, device="cpu"))
    finetune(config)
    results = json.loads((tmp_path / "out" / RESULTS).read_text())
    assert results["dataset"] == "digits" and results["num_labels"] == 10
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert 0 < results["trainable_params"] < results["total_params"] / 10
    assert (tmp_path / "out" / "adapter").is_dir()


def test_dropout_replaces_the_head_dropout_and_the_drop_connect_rate(digits):
    """dropout=0: the head's dropout and the backbone's stochastic depth are off, so a training-mode forward is
    deterministic; the network's own (0.2 each) are kept without it."""
    x = load_model("efficientnet-lite0", digits).collate(digits.train[:4])["pixel_values"]

    def logits(model, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model.train()(x)

    plain = load_model("efficientnet-lite0", digits).model
    assert plain.dropout.p == plain.backbone._global_params.drop_connect_rate == 0.2
    assert not torch.equal(logits(plain, 0), logits(plain, 1))
    model = load_model("efficientnet-lite0", digits, dropout=0.0).model
    assert model.dropout.p == model.backbone._global_params.drop_connect_rate == 0.0
    assert torch.equal(logits(model, 0), logits(model, 1))
