"""surm on quantised and non-float base layers: bitsandbytes 8-bit (LLM.int8) and 4-bit (NF4) on the CPU, and layers
whose weight no quantisation backend knows.

On a quantised base the update is always added outside the base product (never folded into codes); merging goes
through PEFT's quantisation backend (dequantise, add, quantise again) and costs one more quantisation rounding;
a non-float weight without a backend refuses to merge. Every bitsandbytes test loads a tiny Llama saved from a
config with ``from_pretrained(folder, quantization_config=BitsAndBytesConfig(...), device_map="cpu")``, as users do.

Tolerances (measured on a 2-core CPU with AVX512-BF16, bitsandbytes 0.50.2, after one AdamW step at lr 1e-2 from
the zero init; the numbers per family are next to :data:`MERGE_TOLERANCE`): merging re-rounds every weight once,
so the merged logits differ from the unmerged ones by about what quantising the base cost in the first place
(8-bit: 1.0 % of the logits, 4-bit NF4: 10 %). Each weight is also checked against a bound derived from the format.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import peft
import pytest
import torch
import transformers
from peft.utils.quantization_utils import Bnb4bitBackend, Bnb8bitBackend, ForwardOnlyQuantizationBackend
from torch import Tensor, nn
from torch.nn import functional as F

import surm
import surm.peft.layer as layer_module

from .common import FAMILIES, adapter_parameters, make_llama, max_diff, surm_layers
from .helpers import TINY_TARGETS, make_tiny, tiny_input

try:  # optional: the bitsandbytes tests skip where it is not installed or its native library does not load
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional

    BNB_MISSING = None
except Exception as error:  # noqa: BLE001  (ImportError, or OSError/RuntimeError from the native library)
    bitsandbytes = bnb_functional = None
    BNB_MISSING = f"bitsandbytes cannot be imported here ({type(error).__name__}: {error})"

needs_bnb = pytest.mark.skipif(BNB_MISSING is not None, reason=BNB_MISSING or "")

#: bits -> the BitsAndBytesConfig keyword arguments of that width.
BITS: dict[str, dict] = {
    "8bit": {"load_in_8bit": True},
    "4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
}
#: bits -> the PEFT backend a wrapped layer must get.
BACKENDS = {"8bit": Bnb8bitBackend, "4bit": Bnb4bitBackend}
#: Relative error allowed between merged and unmerged logits, ||y_merged - y|| / ||y||, after one training step:
#: one requantisation. Measured (lowrank, circulant, toeplitz, symmetric_toeplitz, kronecker, ldr, monarch):
#: 8-bit 1.01e-2, 1.13e-2, 1.08e-2, 1.29e-2, 0.93e-2, 1.09e-2, 1.02e-2; 4-bit 0.106, 0.111, 0.118, 0.133, 0.105,
#: 0.078, 0.079. The quantised base itself differs from the float model by 1.03e-2 (8-bit) and 0.100 (4-bit) on the
#: same input, and the adapters change the logits by 8-64 %. The limits keep a margin of about 2x.
MERGE_TOLERANCE = {"8bit": 2.5e-2, "4bit": 0.25}
#: The same after merge and unmerge (two requantisations), measured at most 1.15e-2 (8-bit) and 0.174 (4-bit).
UNMERGE_TOLERANCE = {"8bit": 2.5e-2, "4bit": 0.35}
#: Merging after the CPU repacking of 4-bit weights against merging before it (ldr): the weights read from the packed
#: kernel carry bfloat16 block scales, which flip a few codes at their rounding boundaries. Measured 1.5e-2 (ldr;
#: 1.5e-2 to 4.5e-2 over the families), against 7.8e-2 for the merge itself.
REPACKED_MERGE_TOLERANCE = 3e-2
#: bitsandbytes quantises an 8-bit weight from float16: its rounding adds up to 2^-11 of |w| to half a code step.
FLOAT16_ROUNDING = 2.0**-11
#: A 4-bit weight repacked for CPU inference keeps its block scales in bfloat16 and its kernel rounds its output to
#: bfloat16: each adds up to half an ulp, 2^-8 relative, of the block scale.
BFLOAT16_READ = 2.0**-7


# -- building -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> str:
    """A tiny Llama (width 64, 2 layers, grouped-query attention, vocabulary 100) saved to a folder, float32."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_llama().save_pretrained(folder)
    return str(folder)


def load(folder: str, bits: str, device: str = "cpu") -> nn.Module:
    """The tiny Llama loaded quantised to ``bits`` on ``device`` (in eval mode, as from_pretrained returns it)."""
    config = transformers.BitsAndBytesConfig(**BITS[bits])
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map=device)


def token_ids(rows: int = 2, length: int = 12, seed: int = 0, device: str = "cpu") -> Tensor:
    return torch.randint(1, 100, (rows, length), generator=torch.Generator().manual_seed(seed)).to(device)


def adapt(base: nn.Module, family: str, mode: str = "delta", bottleneck: int | None = None, **kwargs) -> nn.Module:
    """surm on every linear layer but the head (delta) or on o_proj / down_proj (adapter mode, the defaults)."""
    if mode == "delta":
        kwargs.setdefault("target_modules", "all-linear")
    config = surm.SurmConfig(structure=family, mode=mode, bottleneck=bottleneck, task_type="CAUSAL_LM", **kwargs)
    return peft.get_peft_model(base, config)


def train_step(model: nn.Module, ids: Tensor) -> tuple[float, set[str], set[str]]:
    """One AdamW step (lr 1e-2, no weight decay) on the causal-LM loss.

    Returns the loss, the parameters whose gradient was non-zero and the parameters (and buffers) that changed.
    """
    model.train()
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    graded = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    optimizer.step()
    optimizer.zero_grad()
    after = model.state_dict(keep_vars=True)
    changed = {name for name, tensor in before.items() if not torch.equal(tensor, after[name].detach())}
    return loss.item(), graded, changed


def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """Eval-mode logits without gradients (on a CPU with AVX512-BF16 this repacks bitsandbytes 4-bit weights)."""
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_error(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def packed(module: nn.Module) -> bool:
    """Whether bitsandbytes repacked the 4-bit weight of a layer (or of a SurmLayer's base) for its CPU kernel."""
    base = module.get_base_layer() if isinstance(module, surm.SurmLayer) else module
    return bool(getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False))


def requantisation_bound(target: Tensor, bits: str) -> Tensor:
    """Elementwise bound on |deq(Q(target)) - target| for bitsandbytes' formats, from the formats themselves.

    8-bit (row-wise absmax): half a step, absmax_row / 254, plus the float16 rounding of the input. NF4 (absmax per
    block of 64 consecutive weights): half the widest gap between adjacent NF4 levels, times the block's absmax.
    """
    if bits == "8bit":
        row_absmax = target.abs().amax(dim=1, keepdim=True)
        return row_absmax / 254 * (1 + FLOAT16_ROUNDING) + target.abs() * FLOAT16_ROUNDING + 1e-7
    levels = bnb_functional.get_4bit_type("nf4", device="cpu").float().sort().values
    half_gap = ((levels[1:] - levels[:-1]).max() / 2).item()
    blocks = target.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    return (half_gap * blocks * (1 + 1e-3) + 1e-7).expand(-1, 64).reshape(target.shape)


def trained(folder: str, bits: str, family: str, mode: str = "delta", bottleneck: int | None = None,
            device: str = "cpu") -> nn.Module:
    """A surm model on the quantised Llama after one training step (which must change its surm parameters only)."""
    torch.manual_seed(0)
    model = adapt(load(folder, bits, device), family, mode, bottleneck)
    loss, graded, changed = train_step(model, token_ids(device=device))
    surm_names = set(adapter_parameters(model))
    assert math.isfinite(loss)
    assert changed and changed <= surm_names, sorted(changed - surm_names)[:3]
    assert graded <= surm_names and graded <= changed
    return model


def assert_merge_requantises_within_one_rounding(model: nn.Module, bits: str) -> None:
    """``merge_adapter`` on a quantised base: W0 <- Q(deq(W0) + s · dense(M)), each weight still a bitsandbytes
    parameter and within :func:`requantisation_bound` of deq(W0) + s · dense(M), with PEFT's warning."""
    layers = surm_layers(model)
    targets = {name: layer.get_base_weight().float() + layer.get_delta_weight("default").float()
               for name, layer in layers.items()}
    with pytest.warns(UserWarning, match=rf"bnb {bits} weight quantises W0 \+ delta again"):
        model.merge_adapter()
    for name, layer in layers.items():
        assert isinstance(layer.get_base_layer().weight, (bitsandbytes.nn.Int8Params, bitsandbytes.nn.Params4bit))
        error = (layer.get_base_weight().float() - targets[name]).abs()
        assert (error <= requantisation_bound(targets[name], bits)).all(), (name, error.max().item())


DELTA_CASES = [(family, bits) for bits in BITS for family in FAMILIES]
DELTA_IDS = [f"{family}-{bits}" for family, bits in DELTA_CASES]
ADAPTER_CASES = [(bits, bottleneck) for bits in BITS for bottleneck in (None, 4)]
ADAPTER_IDS = [f"{bits}-" + (f"k{bottleneck}" if bottleneck else "map") for bits, bottleneck in ADAPTER_CASES]


# -- bitsandbytes: wrapping and the forward ----------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_bitsandbytes_layers_get_peft_backends_and_never_fold(llama_folder, bits, monkeypatch):
    base = load(llama_folder, bits)
    expected_type = bitsandbytes.nn.Linear8bitLt if bits == "8bit" else bitsandbytes.nn.Linear4bit
    model = adapt(base, "toeplitz", init_weights=False, execution="dense")
    layers = surm_layers(model)
    assert len(layers) == 2 * 7  # every linear layer of both blocks; the float lm_head is not wrapped
    ids = token_ids()
    for name, layer in layers.items():
        base_layer = layer.get_base_layer()
        assert isinstance(base_layer, expected_type) and isinstance(layer.quantization_backend, BACKENDS[bits])
        assert (layer.in_features, layer.out_features) == (base_layer.in_features, base_layer.out_features)
        assert f"quantization_backend='bnb {bits}'" in repr(layer)
        x = torch.randn(3, layer.in_features)
        assert not layer.can_fold(layer.surm_delta["default"], x, (), {}), name
        monkeypatch.setattr(layer, "_base_forward_with_weight", lambda *a, **k: 1 / 0)
    model.eval()
    with torch.no_grad():
        y = model(input_ids=ids).logits
        with model.disable_adapter():
            y_base = model(input_ids=ids).logits
    assert torch.isfinite(y).all() and max_diff(y, y_base) > 1e-2  # the random update is applied, outside


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_each_layer_adds_its_update_to_the_quantised_base_output(llama_folder, bits):
    """h = base(x) + s · M(x) on a bitsandbytes layer on both execution paths, the base applied by bitsandbytes."""
    for execution in ("structured", "dense"):
        model = adapt(load(llama_folder, bits), "monarch", init_weights=False, execution=execution).eval()
        layer = surm_layers(model)["model.layers.0.mlp.down_proj"]
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T
            assert max_diff(layer(x), expected) < 1e-5


# -- bitsandbytes: training ----------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(("family", "bits"), DELTA_CASES, ids=DELTA_IDS)
def test_one_training_step_on_a_quantised_base_changes_only_surm_parameters(llama_folder, family, bits):
    model = trained(llama_folder, bits, family)
    for layer in surm_layers(model).values():  # every layer learns, the first ones too (gradients pass the base)
        assert layer.get_delta_weight("default").abs().sum() > 0


@needs_bnb
@pytest.mark.parametrize(("bits", "bottleneck"), ADAPTER_CASES, ids=ADAPTER_IDS)
def test_adapter_mode_trains_runs_and_reloads_on_a_quantised_base_but_never_merges(
    llama_folder, bits, bottleneck, tmp_path
):
    model = trained(llama_folder, bits, "circulant", mode="adapter", bottleneck=bottleneck)
    assert {name.split(".")[-1] for name in surm_layers(model)} == {"o_proj", "down_proj"}
    ids = token_ids(seed=1)
    y = logits(model, ids)
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 15)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load(llama_folder, bits), tmp_path)
    assert max_diff(logits(reloaded, ids), y) < 1e-5
    with pytest.raises(surm.NotMergeableError, match=r"mode 'adapter'"):
        model.merge_and_unload()
    base = model.unload()
    assert not surm_layers(base) and max_diff(logits(base, ids), logits(load(llama_folder, bits), ids)) < 1e-6


@needs_bnb
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # PEFT's call
def test_kbit_training_preparation_with_gradient_checkpointing_trains_surm(llama_folder):
    base = peft.prepare_model_for_kbit_training(load(llama_folder, "4bit"), use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model = adapt(base, "kronecker")
    loss, graded, changed = train_step(model, token_ids())
    assert math.isfinite(loss) and changed and changed <= set(adapter_parameters(model)) and graded <= changed


# -- bitsandbytes: merging ----------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(("family", "bits"), DELTA_CASES, ids=DELTA_IDS)
def test_merging_into_a_quantised_base_requantises_within_one_rounding(llama_folder, family, bits):
    """merge: W0 <- Q(deq(W0) + s · dense(M)); each weight within half a quantisation step of deq(W0) + s · dense(M),
    the merged logits within :data:`MERGE_TOLERANCE` of the unmerged ones; merge_and_unload keeps that merge."""
    model = trained(llama_folder, bits, family)
    ids = token_ids(seed=1)
    unmerged = logits(model, ids)
    assert_merge_requantises_within_one_rounding(model, bits)
    merged = logits(model, ids)
    assert relative_error(merged, unmerged) < MERGE_TOLERANCE[bits]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT: "All adapters are already merged"
        plain = model.merge_and_unload()  # already merged: no second rounding
    assert not surm_layers(plain)
    assert max_diff(logits(plain, ids), merged) < 1e-6


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_unmerging_a_quantised_base_restores_it_within_two_roundings(llama_folder, bits):
    model = trained(llama_folder, bits, "symmetric_toeplitz")
    ids = token_ids(seed=1)
    unmerged = logits(model, ids)
    layers = surm_layers(model)
    originals = {name: layer.get_base_weight().float() for name, layer in layers.items()}
    targets = {name: originals[name] + layer.get_delta_weight("default").float() for name, layer in layers.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.merge_adapter()
    merged = {name: layer.get_base_weight().float() for name, layer in layers.items()}
    model.unmerge_adapter()
    for name, layer in layers.items():
        # deq(Q(T)) = T + e1 and then deq(Q(deq(Q(T)) - delta)) = W0 + e1 + e2, |e1| <= b(T), |e2| <= b(W0 + e1)
        restored = merged[name] - layer.get_delta_weight("default").float()
        bound = requantisation_bound(targets[name], bits) + requantisation_bound(restored, bits)
        assert ((layer.get_base_weight().float() - originals[name]).abs() <= bound).all(), name
    assert not any(layer.merged for layer in layers.values())
    assert relative_error(logits(model, ids), unmerged) < UNMERGE_TOLERANCE[bits]


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_a_non_finite_delta_is_never_quantised_into_the_base(llama_folder, bits):
    model = adapt(load(llama_folder, bits), "circulant", init_weights=False)
    layer = surm_layers(model)["model.layers.0.self_attn.q_proj"]
    codes = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.surm_delta["default"].matrix.column[0] = float("nan")
    with pytest.raises(ValueError, match=r"adapter 'default' has non-finite values in its weight delta"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, codes) and not layer.merged


# -- bitsandbytes 4-bit: weights repacked for CPU inference ---------------------------------------------------------


def _pack(model: nn.Module) -> None:
    """Run an eval-mode forward without gradients, which repacks every 4-bit weight on an AVX512-BF16 CPU."""
    logits(model, token_ids(seed=2))
    if not any(packed(layer) for layer in surm_layers(model).values()):
        pytest.skip("this CPU does not repack bitsandbytes 4-bit weights for inference (no AVX512-BF16)")


@needs_bnb
def test_a_repacked_4bit_weight_is_read_through_its_own_forward(llama_folder):
    model = adapt(load(llama_folder, "4bit"), "circulant")
    layers = surm_layers(model)
    before = {name: layer.get_base_weight().clone() for name, layer in layers.items()}
    _pack(model)
    for name, layer in layers.items():
        assert tuple(layer.get_base_layer().weight.shape) != (layer.in_features * layer.out_features // 2, 1)
        read = layer.get_base_weight()
        assert read.shape == (layer.out_features, layer.in_features)
        assert max_diff(read, before[name]) <= BFLOAT16_READ * before[name].abs().max().item(), name
        assert packed(layer)  # reading leaves the packed weight (and so the model's outputs) alone


@needs_bnb
def test_merging_after_the_4bit_cpu_repacking_equals_merging_before_it(llama_folder):
    ids = token_ids(seed=1)
    reference = trained(llama_folder, "4bit", "ldr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reference.merge_adapter()
    expected = logits(reference, ids)
    model = trained(llama_folder, "4bit", "ldr")
    unmerged = logits(model, ids)
    _pack(model)
    layers = surm_layers(model)
    targets = {n: layer.get_base_weight() + layer.get_delta_weight("default") for n, layer in layers.items()}
    with pytest.warns(UserWarning, match="quantises W0"):
        model.merge_adapter()
    for name, layer in layers.items():
        assert not packed(layer)  # a freshly quantised weight replaced the packed one
        assert ((layer.get_base_weight() - targets[name]).abs() <= requantisation_bound(targets[name], "4bit")).all()
    merged = logits(model, ids)
    assert relative_error(merged, expected) < REPACKED_MERGE_TOLERANCE
    assert relative_error(merged, unmerged) < MERGE_TOLERANCE["4bit"]


@needs_bnb
@pytest.mark.parametrize("mode", ["delta", "adapter"])
def test_training_after_the_4bit_cpu_repacking_still_reaches_every_adapter(llama_folder, mode):
    """bitsandbytes' packed CPU kernel has no backward: surm unpacks every repacked layer, adapted or not (adapter
    mode leaves q, k, v, gate and up unadapted), before a training forward; the gradients are those of a model that
    never ran in eval mode, and the unpacked layers compute what they computed packed."""
    ids = token_ids()
    torch.manual_seed(0)
    fresh = adapt(load(llama_folder, "4bit"), "circulant", mode)
    fresh.train()
    fresh(input_ids=ids, labels=ids).loss.backward()
    expected = {n: p.grad for n, p in fresh.named_parameters() if p.requires_grad}
    base = load(llama_folder, "4bit")
    torch.manual_seed(0)
    model = adapt(base, "circulant", mode)
    _pack(model)
    assert all(packed(m) for m in base.modules() if isinstance(m, bitsandbytes.nn.Linear4bit))
    before = logits(model, ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            scale = expected[name].abs().max().item()
            assert scale > 0 and max_diff(parameter.grad, expected[name]) < 1e-2 * scale, name
    assert not any(packed(m) for m in base.modules() if isinstance(m, bitsandbytes.nn.Linear4bit))
    assert torch.equal(logits(model, ids), before)  # unpacking kept the packed codes and scales exactly


@needs_bnb
@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"], ids=["some", "all"])
def test_saving_after_the_4bit_cpu_repacking_keeps_the_model_intact(llama_folder, targets, tmp_path):
    """bitsandbytes' own unpacking in state_dict() transposes the block scales of layers with more than 64 inputs
    (down_proj here); surm unpacks every layer first, adapted or not, so saving changes nothing and the reloaded
    adapter gives the same outputs."""
    ids = token_ids(seed=1)
    model = adapt(load(llama_folder, "4bit"), "toeplitz", init_weights=False, target_modules=targets)
    y = logits(model, ids)
    _pack(model)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(model, ids), y)
    reloaded = peft.PeftModel.from_pretrained(load(llama_folder, "4bit"), tmp_path)
    assert max_diff(logits(reloaded, ids), y) < 1e-5


@needs_bnb
def test_double_quantised_scales_are_quantised_again_when_a_repacked_weight_is_unpacked(llama_folder):
    """The packing turns double-quantised (8-bit) block scales into bfloat16; unpacking quantises them again, which
    moves the logits slightly (measured 0.3 %, and 0.2 % more at a second unpacking), as bitsandbytes' own would."""
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_folder, quantization_config=config,
                                                             device_map="cpu")
    model = adapt(base, "monarch")
    ids = token_ids(seed=1)
    y = logits(model, ids)
    _pack(model)
    assert model.base_model.unpack_quantized_weights() == 14
    assert model.base_model.unpack_quantized_weights() == 0  # nothing is packed any more
    assert relative_error(logits(model, ids), y) < 1e-2


# -- bitsandbytes: saving and reloading ---------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(("family", "bits"), DELTA_CASES, ids=DELTA_IDS)
def test_a_trained_adapter_reloads_onto_a_freshly_quantised_base(llama_folder, family, bits, tmp_path):
    model = trained(llama_folder, bits, family)
    ids = token_ids(seed=1)
    y = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load(llama_folder, bits), tmp_path)
    assert max_diff(logits(reloaded, ids), y) < 1e-5
    assert all(isinstance(layer.quantization_backend, BACKENDS[bits]) for layer in surm_layers(reloaded).values())


@needs_bnb
def test_full_rank_lora_export_of_a_quantised_model_loads_onto_a_quantised_base(llama_folder, tmp_path):
    """export_lora needs only the adapters' own dense forms; PEFT's LoRA then runs on the 8-bit base."""
    model = trained(llama_folder, "8bit", "monarch")
    ids = token_ids(seed=1)
    y = logits(model, ids)
    surm.export_lora(model, rank="full", output_dir=tmp_path / "lora")
    lora = peft.PeftModel.from_pretrained(load(llama_folder, "8bit"), tmp_path / "lora")
    assert max_diff(logits(lora, ids), y) < 1e-4


# -- bitsandbytes on a CUDA device ------------------------------------------------------------------------------------
# The same checks through bitsandbytes' CUDA kernels (8-bit: LLM.int8's int8 products; 4-bit: NF4 dequantisation).

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_bnb
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_cuda_quantised_layers_add_the_update_outside_their_product(llama_folder, bits):
    model = adapt(load(llama_folder, bits, "cuda"), "monarch", init_weights=False).eval()
    for name, layer in surm_layers(model).items():
        assert isinstance(layer.quantization_backend, BACKENDS[bits]), name
        x = torch.randn(2, 5, layer.in_features, device="cuda")
        assert not layer.can_fold(layer.surm_delta["default"], x, (), {})
        with torch.no_grad():
            expected = layer.get_base_layer()(x) + x @ layer.get_delta_weight("default").T.to(x.dtype)
            assert max_diff(layer(x), expected) < 1e-4, name


@needs_bnb
@needs_cuda
@pytest.mark.parametrize(("family", "bits"), DELTA_CASES, ids=DELTA_IDS)
def test_cuda_quantised_base_trains_merges_within_one_rounding_and_reloads(llama_folder, family, bits, tmp_path):
    model = trained(llama_folder, bits, family, device="cuda")
    ids = token_ids(seed=1, device="cuda")
    unmerged = logits(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(load(llama_folder, bits, "cuda"), tmp_path)
    assert max_diff(logits(reloaded, ids), unmerged) < 1e-5
    assert_merge_requantises_within_one_rounding(model, bits)
    assert all(layer.get_base_layer().weight.device.type == "cuda" for layer in surm_layers(model).values())
    error = relative_error(logits(model, ids), unmerged)
    print(f"cuda {family} {bits}: merged vs unmerged logits, relative error {error:.4f}")
    assert error < MERGE_TOLERANCE[bits]


@needs_bnb
@needs_cuda
@pytest.mark.parametrize("bits", BITS)
def test_cuda_adapter_mode_on_a_quantised_base_trains_generates_and_refuses_to_merge(llama_folder, bits):
    model = trained(llama_folder, bits, "circulant", mode="adapter", device="cuda")
    ids = token_ids(seed=1, device="cuda")
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 15) and generated.device.type == "cuda"
    with pytest.raises(surm.NotMergeableError, match=r"mode 'adapter'"):
        model.merge_and_unload()


# -- bitsandbytes: mixed batches, on the CPU and on a CUDA device ---------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(("device", "bits", "first", "second"), [
    ("cpu", "8bit", "circulant", "lowrank"),
    pytest.param("cuda", "4bit", "kronecker", "ldr", marks=needs_cuda),
], ids=["cpu-8bit", "cuda-4bit"])
def test_mixed_batches_route_rows_on_a_quantised_base(llama_folder, device, bits, first, second):
    model = adapt(load(llama_folder, bits, device), first, init_weights=False)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model.add_adapter("b", surm.SurmConfig(structure=second, target_modules=projections, init_weights=False,
                                           task_type="CAUSAL_LM"))
    ids = token_ids(rows=3, seed=1, device=device)
    routed = model.eval()(input_ids=ids, adapter_names=["default", "__base__", "b"]).logits
    alone = []
    for row, name in enumerate(["default", None, "b"]):
        if name is None:
            with model.disable_adapter():
                alone.append(logits(model, ids[row:row + 1]))
        else:
            model.set_adapter(name)
            alone.append(logits(model, ids[row:row + 1]))
    assert max_diff(routed, torch.cat(alone)) < 1e-4


# -- non-float weights that no backend knows ------------------------------------------------------------------------


class Int8Linear(nn.Linear):
    """A Linear that stores its weight as int8 codes with one float scale per row (a layer no backend knows)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter(torch.round(linear.weight.detach() / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


class Codes(Tensor):
    """A float tensor subclass standing for a quantised tensor type that reports a float dtype (as torchao's do)."""


def int8_tiny(layers: tuple[str, ...] = tuple(TINY_TARGETS)) -> nn.Module:
    """TinyNet with the named layers of every block replaced by :class:`Int8Linear`."""
    model = make_tiny()
    for block in model.encoder.layers:
        for name in layers:
            setattr(block, name, Int8Linear(getattr(block, name)))
    return model


def int8_surm(family: str = "circulant", layers: tuple[str, ...] = tuple(TINY_TARGETS), **kwargs) -> nn.Module:
    config = surm.SurmConfig(structure=family, target_modules=list(TINY_TARGETS), init_weights=False, **kwargs)
    return peft.get_peft_model(int8_tiny(layers), config).eval()


def forward(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("execution", ["structured", "dense", "auto"])
@pytest.mark.parametrize("family", FAMILIES)
def test_an_int8_layer_without_a_backend_adds_the_update_outside_its_product(family, execution, monkeypatch):
    model = int8_surm(family, execution=execution)
    x = tiny_input()
    for layer in surm_layers(model).values():
        assert layer.quantization_backend is None
        assert not layer.can_fold(layer.surm_delta["default"], x, (), {})
        monkeypatch.setattr(layer, "_base_forward_with_weight", lambda *a, **k: 1 / 0)
        rows = torch.randn(4, layer.in_features)
        expected = layer.get_base_layer()(rows) + rows @ layer.get_delta_weight("default").T
        assert max_diff(forward(layer, rows), expected) < 1e-5
        assert layer.get_delta_weight("default").dtype == torch.float32  # never cast to the int8 of the codes
    with model.disable_adapter():
        base = forward(model, x)
    assert max_diff(forward(model, x), base) > 1e-3


@pytest.mark.parametrize(
    "merge",
    [
        lambda model: model.merge_and_unload(),
        lambda model: model.merge_adapter(),
        lambda model: model.merge_and_unload(safe_merge=True),
        lambda model: model.base_model.merge_adapter(["default"]),
    ],
    ids=["merge_and_unload", "merge_adapter", "safe_merge", "named"],
)
def test_merging_into_an_int8_layer_without_a_backend_is_refused_and_changes_nothing(merge: Callable):
    model = int8_surm(layers=("up",))  # mix and down stay float: the refusal comes before any layer is merged
    x = tiny_input()
    y = forward(model, x)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    pattern = (r"^cannot merge surm adapter\(s\) \['default'\] into 'encoder\.layers\.0\.up': its base layer "
               r"Int8Linear holds a weight of type Parameter and dtype torch\.int8, which is not a plain float "
               r"tensor, and no quantisation backend .* can dequantise and requantise it; keep them unmerged .*unload")
    with pytest.raises(surm.NotMergeableError, match=pattern) as caught:
        merge(model)
    assert "\n" not in str(caught.value)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not any(layer.merged for layer in surm_layers(model).values())
    assert torch.equal(forward(model, x), y)


def test_the_layer_itself_refuses_and_unload_keeps_the_int8_layers():
    model = int8_surm()
    layer = surm_layers(model)["encoder.layers.1.down"]
    with pytest.raises(surm.NotMergeableError, match=r"Int8Linear holds a weight of type Parameter and dtype "
                                                    r"torch\.int8"):
        layer.merge()
    assert layer.merge_refusal() is not None and not layer.merged
    x = tiny_input()
    with model.disable_adapter():
        base = forward(model, x)
    plain = model.unload()
    assert isinstance(plain.encoder.layers[1].down, Int8Linear) and torch.equal(forward(plain, x), base)


def test_a_float_tensor_subclass_weight_is_neither_folded_nor_merged():
    """A plain nn.Linear whose weight is a tensor subclass (torchao puts its quantised tensors there)."""
    model = make_tiny()
    linear = model.encoder.layers[0].mix
    linear.weight = nn.Parameter(linear.weight.detach().clone().as_subclass(Codes), requires_grad=False)
    config = surm.SurmConfig(structure="toeplitz", target_modules=["mix"], init_weights=False, execution="dense")
    peft_model = peft.get_peft_model(model, config).eval()
    layer = surm_layers(peft_model)["encoder.layers.0.mix"]
    rows = torch.randn(3, layer.in_features)
    assert not layer.can_fold(layer.surm_delta["default"], rows, (), {})
    expected = F.linear(rows, layer.get_base_layer().weight.as_subclass(Tensor), layer.get_base_layer().bias)
    expected = expected + rows @ layer.get_delta_weight("default").T
    assert max_diff(forward(layer, rows).as_subclass(Tensor), expected) < 1e-5
    with pytest.raises(surm.NotMergeableError, match=r"'encoder\.layers\.0\.mix'.*type Codes and dtype torch\.float32"):
        peft_model.merge_and_unload()


class PackedLinear(nn.Module):
    """A quantised linear layer that is no nn.Linear (as HQQ's, GPTQ's and AQLM's are): int8 codes and row scales."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.inner = Int8Linear(linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def test_a_forward_only_backend_layer_is_adapted_as_linear_and_refuses_to_merge(monkeypatch):
    """A layer type that PEFT resolves to a forward-only backend (GPTQ, AQLM, EETQ): adapted, never merged."""
    monkeypatch.setattr(
        layer_module, "resolve_quantization_backend",
        lambda layer, **kwargs: ForwardOnlyQuantizationBackend("gptq") if isinstance(layer, PackedLinear) else None,
    )
    model = make_tiny()
    for block in model.encoder.layers:
        block.up = PackedLinear(block.up)
    config = surm.SurmConfig(structure="lowrank", target_modules=["up"], init_weights=False)
    peft_model = peft.get_peft_model(model, config).eval()
    layer = surm_layers(peft_model)["encoder.layers.0.up"]
    assert layer.kind == "linear" and (layer.in_features, layer.out_features) == (12, 18)
    rows = torch.randn(3, 12)
    expected = layer.get_base_layer()(rows) + rows @ layer.get_delta_weight("default").T
    assert max_diff(forward(layer, rows), expected) < 1e-5
    with pytest.raises(surm.NotMergeableError, match=r"'encoder\.layers\.0\.up': its base layer PackedLinear is "
                                                    r"quantised by gptq, which cannot dequantise and requantise"):
        peft_model.merge_adapter()


def test_an_unsupported_layer_without_a_backend_is_still_refused():
    class Opaque(nn.Module):
        in_features, out_features = 12, 12

        def forward(self, x: Tensor) -> Tensor:
            return x

    model = make_tiny()
    model.encoder.layers[0].mix = Opaque()
    with pytest.raises(TypeError, match=r"surm cannot adapt Opaque; supported layers: .*quantisation library"):
        peft.get_peft_model(model, surm.SurmConfig(structure="circulant", target_modules=["mix"]))
