"""benchmarks/fft_floor.py: the layers and each family's transforms it counts, the dense path's least work, the
floor's arithmetic, its input checks, and a quick measurement on the tiny Llama stack (timings are never asserted,
only the report's rows)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from surm.commands.decoder_bench import BLOCKS, LORA_LABEL, SHAPES, decoder  # noqa: E402
from surm.structures.fourier import Fourier  # noqa: E402
from surm.structures.ldr import LowDisplacementRank  # noqa: E402

from .scripts import load_script  # noqa: E402


@pytest.fixture(scope="module")
def floor_script():
    return load_script("benchmarks/fft_floor.py")


@pytest.mark.parametrize("size", ["tiny", "TinyLlama"])
def test_the_layer_shapes_are_every_projection_of_every_block(floor_script, size):
    model = decoder(size) if size == "tiny" else None
    hidden, mlp = SHAPES[size]["hidden_size"], SHAPES[size]["intermediate_size"]
    kv = hidden // SHAPES[size]["num_attention_heads"] * SHAPES[size]["num_key_value_heads"]
    block = sorted([(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
                    (hidden, mlp)])
    assert sorted(floor_script.layer_shapes(size)) == sorted(block * BLOCKS)
    if model is not None:  # the configuration's arithmetic is the model's own layers
        built = [(module.out_features, module.in_features) for name, module in model.named_modules()
                 if isinstance(module, torch.nn.Linear) and ".layers." in name]
        assert sorted(built) == sorted(floor_script.layer_shapes(size))


@pytest.mark.parametrize("out_features,in_features", [(2048, 2048), (5632, 2048), (2048, 5632), (256, 2048), (7, 5)])
def test_transform_lengths_are_each_familys_own(floor_script, out_features, in_features):
    m, n = out_features, in_features
    for family in ("toeplitz", "symmetric_toeplitz"):
        ((length, count),) = floor_script.FLOORS[family].transforms(m, n)
        assert length >= m + n - 1 and count == 4
    assert floor_script.FLOORS["circulant"].transforms(m, n) == ((max(m, n), 4),)
    ldr = LowDisplacementRank(m, n)
    assert floor_script.FLOORS["ldr"].transforms(m, n) == ((ldr._skew_length(), 4), (ldr.size, 4))
    expected = ((n, 4),) if m == n else ((n, 2), (m, 2))
    assert floor_script.FLOORS["fourier"].transforms(m, n) == expected


@pytest.mark.parametrize("out_features,in_features", [(6, 4), (3, 5), (256, 2048)])
def test_fouriers_frequency_count_is_the_familys_default(floor_script, out_features, in_features):
    assert floor_script.fourier_frequencies(out_features, in_features) == Fourier(out_features, in_features).frequencies


def _times(floor_script, size, families, spectral, dense, steps):
    """Every row of ``report`` at ``size``: LoRA 100 ms, no adapter 80 ms, the given per-shape and step times."""
    times = {LORA_LABEL: [0.100] * 3, floor_script.NO_ADAPTER: [0.080] * 3}
    for shape in dict.fromkeys(floor_script.layer_shapes(size)):
        times[floor_script.dense_label(shape)] = [dense(shape)] * 3
        for family in families:
            times[floor_script.spectral_label(family, shape)] = [spectral(family, shape)] * 3
    for family in families:
        times[floor_script.step_label(family)] = [steps[family]] * 3
    return times


def test_the_floor_is_the_bare_step_plus_each_layers_least_path(floor_script):
    # tiny: per block q, k, v, o, gate, up, down = 256 x 256, 64 x 256 (twice), 256 x 256, 688 x 256 (twice), 256 x 688.
    def spectral(family, shape):
        return 0.001 if shape != (64, 256) else 0.004  # k and v: dense is the less

    def dense(shape):
        return 0.002

    times = _times(floor_script, "tiny", ["toeplitz"], spectral, dense, {"toeplitz": 0.120})
    text = floor_script.report("tiny", ["toeplitz"], times)
    # per block 5 spectral layers at 1 ms and 2 dense at 2 ms: 9 ms, 2 blocks: 18 ms; (80 + 18) / 100.
    assert ("| toeplitz | 4 of 512 / 4 of 960 | 1.200 | 0.980 | 256 x 256: spectral, 64 x 256: dense, "
            "688 x 256: spectral, 256 x 688: spectral |") in text
    assert f"| {LORA_LABEL} | 100.00 | 0.00 | 1.000 |" in text


def test_a_familys_dense_form_is_added_to_its_dense_least_work(floor_script):
    # Fourier's dense form costs 3 ms on every shape: dense 2 + 3 = 5 ms loses to spectral 4 ms everywhere.
    times = _times(floor_script, "tiny", ["fourier", "toeplitz"], lambda family, shape: 0.004, lambda shape: 0.002,
                   {"fourier": 0.150, "toeplitz": 0.120})
    for shape in dict.fromkeys(floor_script.layer_shapes("tiny")):
        times[floor_script.dense_form_label("fourier", shape)] = [0.003] * 3
    text = floor_script.report("tiny", ["fourier", "toeplitz"], times)
    # 14 layers: Fourier (80 + 14 x 4) / 100, Toeplitz (80 + 14 x 2) / 100.
    assert "| fourier | 4 of 256 / 2 of 256 + 2 of 688 | 1.500 | 1.360 | 256 x 256: spectral, 64 x 256: spectral" in text
    assert "| toeplitz | 4 of 512 / 4 of 960 | 1.200 | 1.080 | 256 x 256: dense, 64 x 256: dense" in text


@pytest.mark.parametrize("out_features,in_features,rank", [(5, 5, 1), (7, 4, 2), (4, 7, 3), (1, 1, 1), (6, 1, 2),
                                                           (1, 6, 1), (64, 256, 1), (96, 33, 4)])
def test_the_displacement_construction_is_ldrs_dense_form(floor_script, out_features, in_features, rank):
    """The construction LDR's dense floor times builds the family's own M (float64, square, rectangular, odd)."""
    torch.manual_seed(0)
    matrix = LowDisplacementRank(out_features, in_features, rank, init="random").double()
    with torch.no_grad():
        matrix.circulant_columns.normal_()
        expected = matrix.dense()
        built = floor_script.displacement_dense(matrix.circulant_columns, matrix.skew_columns, out_features,
                                                in_features)
    assert built.shape == (out_features, in_features)
    torch.testing.assert_close(built, expected, rtol=1e-12, atol=1e-12)


def test_the_dense_forms_least_work(floor_script, monkeypatch):
    """Fourier's: one real 2-D transform each way, of the (m, n) matrix; LDR's: no transform, two running sums."""
    calls = []
    for name in ("rfft", "irfft", "rfft2", "irfft2"):
        real = getattr(floor_script.torch.fft, name)
        monkeypatch.setattr(floor_script.torch.fft, name, lambda t, *a, _n=name, _real=real, **k: calls.append(
            (_n, k.get("s"))) or _real(t, *a, **k))
    real_cumsum = floor_script.torch.cumsum
    monkeypatch.setattr(floor_script.torch, "cumsum", lambda t, *a, **k: calls.append(("cumsum", tuple(t.shape)))
                        or real_cumsum(t, *a, **k))
    for build, expected in ((floor_script.fourier_dense_form((6, 4)), [("irfft2", (6, 4)), ("rfft2", None)]),
                            (floor_script.ldr_dense_form((3, 5)), [("cumsum", (5, 5)), ("cumsum", (5, 5))])):
        calls.clear()  # what building the operands did
        build()
        assert calls == expected


def test_the_dense_least_work_is_the_fold_the_weight_gradient_and_its_reduction(floor_script, monkeypatch):
    run = floor_script.dense_least_work((6, 4), tokens=3)
    calls = []
    real_mm, real_add = floor_script.torch.mm, floor_script.torch.add
    monkeypatch.setattr(floor_script.torch, "mm", lambda a, b, **k: calls.append(("mm", a.shape, b.shape))
                        or real_mm(a, b, **k))
    monkeypatch.setattr(floor_script.torch, "add", lambda a, b, **k: calls.append(("add", a.shape))
                        or real_add(a, b, **k))
    run()
    assert calls == [("add", (6, 4)), ("mm", (6, 3), (3, 4))]


def _transforms_made(floor_script, monkeypatch, run):
    """(kind, length) of every real transform ``run`` makes, in order."""
    calls = []
    real = {"rfft": floor_script.torch.fft.rfft, "irfft": floor_script.torch.fft.irfft}
    for kind, transform in real.items():
        def spy(tensor, *args, _kind=kind, _transform=transform, **kwargs):
            full = tensor.shape[-1] if _kind == "rfft" else 2 * (tensor.shape[-1] - 1)
            calls.append((_kind, kwargs.get("n", full)))
            return _transform(tensor, *args, **kwargs)
        monkeypatch.setattr(floor_script.torch.fft, kind, spy)
    run()
    return calls


def test_the_convolutions_least_work_is_four_transforms_per_layer(floor_script, monkeypatch):
    run = floor_script.FLOORS["toeplitz"].build([(6, 4), (3, 5)], 2)
    assert _transforms_made(floor_script, monkeypatch, run) == [("rfft", 9), ("irfft", 9), ("rfft", 9), ("irfft", 9),
                                                                 ("rfft", 8), ("irfft", 8), ("rfft", 8), ("irfft", 8)]


def test_ldrs_least_work_is_four_transforms_of_each_length_per_layer(floor_script, monkeypatch):
    # (6, 4): N = 6, L = 6 + 4 - 1 = 9 (5-smooth); (3, 5): N = 5, L = 5 + 5 - 1 = 9.
    run = floor_script.FLOORS["ldr"].build([(6, 4), (3, 5)], 2)
    assert _transforms_made(floor_script, monkeypatch, run) == [
        ("rfft", 9), ("irfft", 9), ("rfft", 6), ("irfft", 6), ("rfft", 6), ("irfft", 6), ("rfft", 9), ("irfft", 9),
        ("rfft", 9), ("irfft", 9), ("rfft", 5), ("irfft", 5), ("rfft", 5), ("irfft", 5), ("rfft", 9), ("irfft", 9)]


def test_fouriers_least_work_is_two_transforms_at_each_side_per_layer(floor_script, monkeypatch):
    run = floor_script.FLOORS["fourier"].build([(6, 4), (3, 5)], 2)
    assert _transforms_made(floor_script, monkeypatch, run) == [("rfft", 4), ("irfft", 6), ("rfft", 6), ("irfft", 4),
                                                                 ("rfft", 5), ("irfft", 3), ("rfft", 3), ("irfft", 5)]


@pytest.mark.parametrize("argv,named", [(["--families", "monarch"], "'monarch'"), (["--families", ","], "','"),
                                        (["--repeats", "0"], "--repeats 0"), (["--threads", "0"], "--threads 0"),
                                        (["--size", "huge"], "'huge'")])
def test_bad_arguments_stop_before_any_work(floor_script, argv, named, capsys, monkeypatch):
    monkeypatch.setattr(floor_script, "measure", lambda *a, **k: pytest.fail("measured despite bad arguments"))
    with pytest.raises(SystemExit) as stop:
        floor_script.main(argv)
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in error and named in error


def test_a_quick_measurement_reports_every_row(floor_script):
    families = ["toeplitz", "circulant", "ldr", "fourier"]
    times = floor_script.measure("tiny", families, warmup=0, repeats=1, batch=(1, 4))
    shapes = set(floor_script.layer_shapes("tiny"))
    assert set(times) == {LORA_LABEL, floor_script.NO_ADAPTER} | {floor_script.dense_label(s) for s in shapes} | {
        floor_script.step_label(family) for family in families} | {
        floor_script.spectral_label(family, s) for family in families for s in shapes} | {
        floor_script.dense_form_label(family, s) for family in ("ldr", "fourier") for s in shapes}
    assert all(len(samples) == 1 and samples[0] > 0 for samples in times.values())
    text = floor_script.report("tiny", families, times, batch=(1, 4))
    assert "batch 1 x 4 tokens" in text
    assert all(text.count(f"\n| {family} | ") == 1 for family in families)
