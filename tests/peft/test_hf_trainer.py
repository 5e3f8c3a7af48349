"""An ordinary Transformers ``Trainer`` script with ``SurmConfig`` where ``LoraConfig`` would be: it trains, saves and
loads like any PEFT method (real MiniLM, real ``mr`` sentences)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer, TrainingArguments

import surm
from surm.data import load_dataset

from .helpers import make_minilm, minilm_path

#: Trains MiniLM end to end (deselect with -m "not slow").
pytestmark = pytest.mark.slow


class Texts(torch.utils.data.Dataset):
    """Tokenised examples as the dicts ``Trainer`` expects."""

    def __init__(self, examples: list, tokenizer) -> None:
        self.items = [
            {**tokenizer(example.text, truncation=True, max_length=32), "labels": example.label} for example in examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
        surm.SurmConfig(structure="circulant", target_modules=["query", "value"], modules_to_save=["classifier"]),
        surm.SurmConfig(structure="monarch", mode="adapter", modules_to_save=["classifier"]),
    ],
    ids=["lora-reference", "surm-circulant", "surm-monarch-adapter"],
)
def test_transformers_trainer_trains_saves_and_loads(config, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    splits = load_dataset("mr")
    train, evaluation = Texts(splits.train[:32], tokenizer), Texts(splits.validation[:16], tokenizer)
    model = get_peft_model(make_minilm(), config)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        num_train_epochs=1, learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=DataCollatorWithPadding(tokenizer))
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], p.detach())]
    assert sorted(changed) == sorted(before)

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    batch = DataCollatorWithPadding(tokenizer)([evaluation[i] for i in range(4)])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        loaded = PeftModel.from_pretrained(make_minilm(), tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
