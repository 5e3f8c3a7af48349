"""Supervised fine-tuning of a causal language model with a surm adapter, the way LoRA users do it with PEFT and the
Transformers ``Trainer``: ``SurmConfig`` where ``LoraConfig`` would be, ``target_modules="all-linear"``, train, save,
reload in a fresh model, merge, generate.

    python examples/sft_causal_lm.py --model path/to/llama-or-qwen --structure monarch --output runs/sft
    python examples/sft_causal_lm.py --model tiny-llama --output runs/sft-tiny      # a Llama built from a config

The data are the embedded ``trec`` questions as prompt/answer pairs ("Question: ... Category: LOC"); only the answer
tokens are trained on. ``tiny-llama`` has random weights (no pretrained causal LM ships with surm) and MiniLM's
tokenizer: it shows the mechanics, not a useful model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

import surm
from surm.data import load_dataset
from surm.models import minilm_path


def load(name: str, seed: int) -> tuple[torch.nn.Module, object]:
    """The causal LM and its tokenizer: a local or Hub model, or ``tiny-llama`` (random weights, MiniLM's tokenizer)."""
    if name != "tiny-llama":
        tokenizer = AutoTokenizer.from_pretrained(name)
        return AutoModelForCausalLM.from_pretrained(name, torch_dtype=torch.float32), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    return LlamaForCausalLM(config), tokenizer


def prompt(text: str) -> str:
    return f"Question: {text}\nCategory:"


class PromptAnswers(torch.utils.data.Dataset):
    """Tokenised ``prompt + " " + answer`` pairs; labels are -100 on the prompt, so only the answer is learnt."""

    def __init__(self, examples: list, label_names: tuple[str, ...], tokenizer, max_length: int) -> None:
        self.items = []
        for example in examples:
            prompt_ids = tokenizer(prompt(example.text), add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(" " + label_names[example.label], add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + answer_ids + [tokenizer.sep_token_id or tokenizer.eos_token_id])[:max_length]
            labels = ([-100] * len(prompt_ids) + ids[len(prompt_ids):])[:max_length]
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate(pad_id: int):
    def pad(items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), width), pad_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(item["input_ids"]), torch.tensor(
                item["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return pad


def generate(model: torch.nn.Module, tokenizer, texts: list[str], tokens: int) -> list[str]:
    """Greedy continuations of the prompts of ``texts``."""
    answers = []
    model.eval()
    for text in texts:
        ids = tokenizer(prompt(text), add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", help="a local causal LM folder, a Hub id, or tiny-llama")
    parser.add_argument("--structure", default="monarch", choices=sorted(surm.STRUCTURES))
    parser.add_argument("--mode", default="delta", choices=["delta", "adapter"])
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=None, help="default: the family's default_lr")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)

    model, tokenizer = load(args.model, args.seed)
    data = load_dataset("trec", seed=args.seed)
    train = PromptAnswers(data.train[: args.train_size], data.label_names, tokenizer, args.max_length)
    config = surm.SurmConfig(structure=args.structure, mode=args.mode, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    lr = args.lr if args.lr is not None else surm.STRUCTURES[args.structure].default_lr
    trainer = Trainer(model=model, train_dataset=train, data_collator=collate(tokenizer.pad_token_id),
                      args=TrainingArguments(output_dir=str(args.output / "trainer"), per_device_train_batch_size=16,
                                             num_train_epochs=args.epochs, learning_rate=lr, report_to=[],
                                             save_strategy="no", logging_steps=10, use_cpu=not torch.cuda.is_available(),
                                             seed=args.seed, disable_tqdm=True))
    result = trainer.train()
    model.save_pretrained(args.output / "adapter")

    # A fresh base model with the saved adapter gives the same continuations, before and after merging.
    questions = [example.text for example in data.validation[:4]]
    trained = generate(model, tokenizer, questions, tokens=4)
    base, _ = load(args.model, args.seed)
    reloaded = PeftModel.from_pretrained(base, args.output / "adapter")
    unmerged = generate(reloaded, tokenizer, questions, tokens=4)
    merged = generate(reloaded.merge_and_unload(), tokenizer, questions, tokens=4) if args.mode == "delta" else None
    report = {"train_loss": result.training_loss, "steps": result.global_step, "questions": questions,
              "answers": trained, "reloaded_answers": unmerged, "merged_answers": merged}
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
