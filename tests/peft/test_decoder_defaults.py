"""Decoder LLMs (tiny models built from configs, random weights): adapter mode's default placement is Houlsby's, after
the attention output and the MLP output projection of every block; ``target_modules="all-linear"`` adapts every
linear layer but the output head. Both start as the base model and generate."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

import surm

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "vocab_size": 50, "bos_token_id": 0, "eos_token_id": None, "pad_token_id": 0}
GQA = {**SMALL, "num_key_value_heads": 2}
#: model type -> (config, the module names adapter mode must wrap in each block).
DECODERS = {
    "llama": (transformers.LlamaConfig(**GQA), {"self_attn.o_proj", "mlp.down_proj"}),
    "mistral": (transformers.MistralConfig(**GQA), {"self_attn.o_proj", "mlp.down_proj"}),
    "qwen2": (transformers.Qwen2Config(**GQA), {"self_attn.o_proj", "mlp.down_proj"}),
    "gemma": (transformers.GemmaConfig(**GQA, head_dim=8), {"self_attn.o_proj", "mlp.down_proj"}),
    "phi": (transformers.PhiConfig(**SMALL), {"self_attn.dense", "mlp.fc2"}),
    "phi3": (transformers.Phi3Config(**GQA), {"self_attn.o_proj", "mlp.down_proj"}),
    "gpt2": (transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, bos_token_id=0, eos_token_id=None),
             {"attn.c_proj", "mlp.c_proj"}),
}


def decoder(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(DECODERS[model_type][0]).eval()


def wrapped(model: torch.nn.Module) -> set[str]:
    """The SurmLayers of a PEFT model, as ``<module>.<submodule>`` within their block."""
    return {".".join(n.split(".")[-2:]) for n, m in model.named_modules() if isinstance(m, surm.SurmLayer)}


@pytest.mark.parametrize("model_type", DECODERS)
def test_adapter_mode_defaults_to_houlsby_placement_and_starts_as_the_base_model(model_type):
    base = decoder(model_type)
    ids = torch.randint(1, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = peft.get_peft_model(base, surm.SurmConfig(structure="monarch", mode="adapter", task_type="CAUSAL_LM"))
    layers = [m for m in model.modules() if isinstance(m, surm.SurmLayer)]
    assert wrapped(model) == DECODERS[model_type][1] and len(layers) == 2 * 2  # two per block, two blocks
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 9)


@pytest.mark.parametrize("model_type", DECODERS)
def test_all_linear_adapts_every_linear_layer_but_the_head(model_type):
    model = peft.get_peft_model(decoder(model_type), surm.SurmConfig(structure="circulant", target_modules="all-linear",
                                                                     task_type="CAUSAL_LM"))
    linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    plain = [n for n, m in model.named_modules() if isinstance(m, linear) and ".base_layer" not in n]
    assert plain == ["base_model.model.lm_head"]  # every other linear layer is wrapped
    assert len([m for m in model.modules() if isinstance(m, surm.SurmLayer)]) >= 4 * 2


def test_a_decoder_without_defaults_names_the_way_out():
    config = transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="has no default target_modules for model_type='gpt_neox'; pass "
                                         "target_modules"):
        peft.get_peft_model(model, surm.SurmConfig(mode="adapter", task_type="CAUSAL_LM"))
