"""Text classification with a surm adapter in an ordinary PEFT + Transformers ``Trainer`` script: ``SurmConfig`` where
``LoraConfig`` would be; train, evaluate, save, reload in a fresh model and check the predictions agree.

    python examples/classify.py --dataset mr --structure monarch --output runs/classify
    python examples/classify.py --model path/to/bert --dataset my.csv --text-column sentence --output runs/mine

``surm finetune`` does the same with its own loop (checkpoints, resume, the results file); this script is for users
who keep their Trainer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import surm
from surm.data import load_dataset
from surm.models import minilm_path


class Texts(torch.utils.data.Dataset):
    """Tokenised examples as the dicts ``Trainer`` expects."""

    def __init__(self, examples: list, tokenizer, max_length: int) -> None:
        self.items = [{**tokenizer(e.text, e.text_pair, truncation=True, max_length=max_length), "labels": e.label}
                      for e in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def classifier(path: str, labels: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the fresh classification head
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=labels)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="'minilm' (embedded) or a local folder / Hub id")
    parser.add_argument("--dataset", default="mr", help="mr, trec, sms or a local CSV/TSV/JSONL file")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--structure", default="monarch", choices=sorted(surm.STRUCTURES))
    parser.add_argument("--mode", default="delta", choices=["delta", "adapter"])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=None, help="default: the family's default_lr")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    path = minilm_path() if args.model == "minilm" else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = load_dataset(args.dataset, text_column=args.text_column, label_column=args.label_column, seed=args.seed)
    train = Texts(data.train[: args.train_size], tokenizer, args.max_length)
    evaluation = Texts(data.validation[: args.eval_size], tokenizer, args.max_length)
    config = surm.SurmConfig(structure=args.structure, mode=args.mode, task_type="SEQ_CLS")  # default targets
    model = get_peft_model(classifier(path, data.num_labels, args.seed), config)
    model.print_trainable_parameters()
    lr = args.lr if args.lr is not None else surm.STRUCTURES[args.structure].default_lr
    trainer = Trainer(
        model=model, train_dataset=train, eval_dataset=evaluation, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=lambda p: {"accuracy": float(np.mean(np.argmax(p.predictions, -1) == p.label_ids))},
        args=TrainingArguments(output_dir=str(args.output / "trainer"), per_device_train_batch_size=32,
                               per_device_eval_batch_size=64, num_train_epochs=args.epochs, learning_rate=lr,
                               report_to=[], save_strategy="no", logging_steps=20, seed=args.seed, disable_tqdm=True,
                               use_cpu=not torch.cuda.is_available()))
    trainer.train()
    metrics = trainer.evaluate()
    model.save_pretrained(args.output / "adapter")

    # A fresh model with the saved adapter predicts the same classes.
    reloaded = PeftModel.from_pretrained(classifier(path, data.num_labels, args.seed), args.output / "adapter").eval()
    batch = DataCollatorWithPadding(tokenizer)([evaluation[i] for i in range(min(16, len(evaluation)))])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        same = bool(torch.equal(model(**batch).logits.argmax(-1), reloaded(**batch).logits.argmax(-1)))
    report = {"validation_accuracy": metrics["eval_accuracy"], "validation_loss": metrics["eval_loss"],
              "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "reloaded_predictions_agree": same}
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
