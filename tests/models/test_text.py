"""Text classifiers (surm.models.text): the Transformers head or a masked mean of the token states, offline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import BertForSequenceClassification  # noqa: E402

from surm.data import load_dataset  # noqa: E402
from surm.models import declared_pooling, load_model, load_text_classifier, minilm_path  # noqa: E402
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
    loaded = load_text_classifier("minilm", num_labels=2, max_length=16, pooling="model")
    assert isinstance(loaded.model, BertForSequenceClassification) and loaded.task_type == "SEQ_CLS"
    assert loaded.pooling == "model"


def test_the_default_pooling_is_the_one_the_checkpoint_declares():
    """all-MiniLM-L6-v2 is a sentence-transformers model whose 1_Pooling averages the tokens: ``auto`` gives the
    masked mean, and the loaded model says which pooling it used."""
    assert declared_pooling(minilm_path()) == "mean"
    loaded = load_text_classifier("minilm", num_labels=2, max_length=16)
    assert isinstance(loaded.model, MeanPooledClassifier) and loaded.pooling == "mean" and loaded.task_type is None


def sentence_transformers_folder(root, modules, pooling_config=None, folder="1_Pooling"):
    """A model folder holding only sentence-transformers' two JSON files (declared_pooling reads nothing else)."""
    root.mkdir(exist_ok=True)
    (root / "modules.json").write_text(modules if isinstance(modules, str) else json.dumps(modules))
    if pooling_config is not None:
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "config.json").write_text(
            pooling_config if isinstance(pooling_config, str) else json.dumps(pooling_config))
    return str(root)


POOLING = {"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}
TRANSFORMER = {"type": "sentence_transformers.models.Transformer", "path": ""}
MODES = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}


@pytest.mark.parametrize("modes, expected", [
    ({"pooling_mode_mean_tokens": True}, "mean"),
    ({"pooling_mode_cls_token": True}, "model"),  # [CLS] without BERT's pooler: not a pooling surm builds
    ({"pooling_mode_max_tokens": True}, "model"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "model"),  # concatenated: not the mean
])
def test_declared_pooling_reads_the_pooling_module_config(tmp_path, modes, expected):
    folder = sentence_transformers_folder(tmp_path / "m", [TRANSFORMER, POOLING], {**MODES, **modes})
    assert declared_pooling(folder) == expected


def test_a_checkpoint_without_a_declaration_keeps_the_transformers_classifier(tmp_path):
    assert declared_pooling(str(tmp_path)) == "model"  # no modules.json: a plain Transformers checkpoint
    assert declared_pooling(sentence_transformers_folder(tmp_path / "a", [TRANSFORMER])) == "model"
    assert declared_pooling(sentence_transformers_folder(tmp_path / "b", [TRANSFORMER, POOLING])) == "model"


@pytest.mark.parametrize("modules, config, message", [
    ("[{", None, r"^modules.json of model '.*' is not valid JSON"),
    ({"type": "x"}, None, r"^modules.json of model '.*' is not a list of modules with a 'type' and a 'path'$"),
    ([{**POOLING, "path": "../elsewhere"}], None, r"places its pooling module at '../elsewhere', which is not a folder "
                                                  r"inside the model's$"),
    ([{**POOLING, "path": "/etc"}], None, r"places its pooling module at '/etc'"),
    ([POOLING], "{not json", r"^1_Pooling/config.json of model '.*' is not valid JSON"),
    ([POOLING], {"pooling_mode_mean_tokens": "yes"}, r"has no true/false pooling_mode_\* entries$"),
    ([POOLING], [1, 2], r"has no true/false pooling_mode_\* entries$"),
])
def test_a_malformed_declaration_is_refused_naming_the_file(tmp_path, modules, config, message):
    folder = sentence_transformers_folder(tmp_path / "m", modules, config)
    with pytest.raises(ValueError, match=message):
        declared_pooling(folder)


def test_unknown_pooling_is_refused_before_any_model_is_read():
    with pytest.raises(ValueError, match=r"^pooling 'max' is not one of auto, model, mean$"):
        load_text_classifier("no-such/model", num_labels=2, pooling="max")


def test_image_models_refuse_a_text_pooling():
    with pytest.raises(ValueError, match="pooling 'mean' applies to text models"):
        load_model("efficientnet-lite0", load_dataset("digits"), pooling="mean")
    assert load_model("efficientnet-lite0", load_dataset("digits")).pooling == "model"  # auto: the feature-map mean


def _train_mode_logits(loaded, seed):
    batch = loaded.collate(examples(SHORT, LONG))
    batch.pop("labels")
    torch.manual_seed(seed)
    with torch.no_grad():
        output = loaded.model.train()(**batch)
    return getattr(output, "logits", output)


@pytest.mark.parametrize("pooling", ["mean", "model"])
def test_dropout_replaces_every_dropout_of_the_checkpoint_and_the_head(pooling):
    """dropout=0 zeroes the config's probabilities and every dropout layer, so a training-mode forward is
    deterministic; the checkpoint's own (0.1) draws different masks under different seeds."""
    plain = load_text_classifier("minilm", num_labels=2, max_length=16, pooling=pooling)
    assert not torch.equal(_train_mode_logits(plain, 0), _train_mode_logits(plain, 1))
    loaded = load_text_classifier("minilm", num_labels=2, max_length=16, pooling=pooling, dropout=0.0)
    config = loaded.model.config if pooling == "model" else loaded.model.encoder.config
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0
    dropouts = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) > 12 and all(m.p == 0.0 for m in dropouts)
    assert torch.equal(_train_mode_logits(loaded, 0), _train_mode_logits(loaded, 1))
    half = load_text_classifier("minilm", num_labels=2, max_length=16, pooling=pooling, dropout=0.3)
    assert {m.p for m in half.model.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
