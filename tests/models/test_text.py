"""Text classifiers (surm.models.text): the Transformers head or a masked mean of the token states, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from surm.data import load_dataset  # noqa: E402
from surm.models import load_model, load_text_classifier  # noqa: E402
from surm.models.text import MeanPooledClassifier  # noqa: E402

SHORT, LONG = "what is a bat ?", "how many miles is it from the north pole to the south pole by air ?"


def examples(*texts):
    data = load_dataset("trec")
    return [type(data.train[0])(text=t, label=0) for t in texts]


@pytest.fixture(scope="module")
def mean_pooled():
    torch.manual_seed(0)
    return load_text_classifier("minilm", num_labels=6, max_length=32, pooling="mean")


def test_mean_pooling_averages_the_token_states_over_the_mask(mean_pooled):
    model = mean_pooled.model.eval()
    assert isinstance(model, MeanPooledClassifier) and mean_pooled.task_type is None
    assert mean_pooled.head == ["classifier"]
    batch = mean_pooled.collate(examples(SHORT, LONG))
    batch.pop("labels")
    mask = batch["attention_mask"]
    assert mask[0].sum() < mask.shape[1]  # the short text is padded in this batch
    with torch.no_grad():
        logits = model(**batch)
        hidden = model.encoder(**batch).last_hidden_state
        alone = model(**{k: v[:1, :int(mask[0].sum())] for k, v in batch.items()})
    expected = torch.stack([hidden[i, :int(mask[i].sum())].mean(0) for i in range(2)]) @ model.classifier.weight.T
    torch.testing.assert_close(logits, expected + model.classifier.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:1], alone, rtol=1e-5, atol=1e-5)  # padding changes nothing


def test_mean_pooled_head_is_fresh_and_seeded(mean_pooled):
    head = mean_pooled.model.classifier
    assert head.weight.shape == (6, 384) and torch.all(head.bias == 0)
    assert 0.015 < float(head.weight.detach().std()) < 0.025  # normal(0, initializer_range 0.02), as Transformers' heads
    torch.manual_seed(0)
    again = load_text_classifier("minilm", num_labels=6, max_length=32, pooling="mean").model.classifier
    assert torch.equal(again.weight, head.weight)


def test_model_pooling_is_the_transformers_sequence_classifier():
    loaded = load_text_classifier("minilm", num_labels=2, max_length=16)
    assert isinstance(loaded.model, BertForSequenceClassification) and loaded.task_type == "SEQ_CLS"


def test_unknown_pooling_is_refused_before_any_model_is_read():
    with pytest.raises(ValueError, match=r"^pooling 'max' is not one of model, mean$"):
        load_text_classifier("no-such/model", num_labels=2, pooling="max")


def test_image_models_refuse_a_text_pooling():
    with pytest.raises(ValueError, match="pooling 'mean' applies to text models"):
        load_model("efficientnet-lite0", load_dataset("digits"), pooling="mean")
