"""benchmarks/fft_floor.py: the layers and transform lengths it counts, the floor's arithmetic, its input checks, and
a quick measurement on the tiny Llama stack (timings are never asserted, only the report's rows)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from surm.commands.decoder_bench import BLOCKS, LORA_LABEL, SHAPES, decoder  # noqa: E402

from .scripts import load_script  # noqa: E402


@pytest.fixture(scope="module")
def floor_script():
    return load_script("benchmarks/fft_floor.py")


def test_the_layers_are_every_projection_of_every_block(floor_script):
    hidden, mlp = SHAPES["tiny"]["hidden_size"], SHAPES["tiny"]["intermediate_size"]
    kv = hidden // SHAPES["tiny"]["num_attention_heads"] * SHAPES["tiny"]["num_key_value_heads"]
    block = sorted([(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden),
                    (hidden, mlp)])
    assert sorted(floor_script.linear_shapes(decoder("tiny"))) == sorted(block * BLOCKS)


@pytest.mark.parametrize("out_features,in_features", [(2048, 2048), (5632, 2048), (2048, 5632), (256, 2048), (7, 5)])
def test_transform_lengths_hold_the_product_without_wrapping(floor_script, out_features, in_features):
    assert floor_script.LENGTHS["toeplitz"](out_features, in_features) >= out_features + in_features - 1
    assert floor_script.LENGTHS["symmetric_toeplitz"](out_features, in_features) >= out_features + in_features - 1
    assert floor_script.LENGTHS["circulant"](out_features, in_features) == max(out_features, in_features)


def test_the_floor_is_the_bare_step_plus_the_least_spectral_work(floor_script):
    times = {LORA_LABEL: [0.100] * 3, floor_script.NO_ADAPTER: [0.080] * 3,
             "surm toeplitz, all-linear": [0.120] * 3, "toeplitz's least spectral work": [0.030] * 3}
    text = floor_script.report("TinyLlama", ["toeplitz"], times)
    assert "| toeplitz | 4096 / 7680 | 1.200 | 1.100 |" in text
    assert f"| {LORA_LABEL} | 100.0 | 0.0 | 1.000 |" in text


def test_the_least_work_is_four_transforms_per_layer(floor_script, monkeypatch):
    run = floor_script.least_work([(6, 4), (3, 5)], floor_script.LENGTHS["toeplitz"], tokens=2)
    calls = []
    real_rfft, real_irfft = floor_script.torch.fft.rfft, floor_script.torch.fft.irfft
    monkeypatch.setattr(floor_script.torch.fft, "rfft",
                        lambda *a, **k: calls.append(("rfft", k["n"])) or real_rfft(*a, **k))
    monkeypatch.setattr(floor_script.torch.fft, "irfft",
                        lambda *a, **k: calls.append(("irfft", k["n"])) or real_irfft(*a, **k))
    run()
    assert calls == [("rfft", 9), ("irfft", 9), ("rfft", 9), ("irfft", 9), ("rfft", 8), ("irfft", 8), ("rfft", 8),
                     ("irfft", 8)]


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
    families = ["toeplitz", "circulant"]
    times = floor_script.measure("tiny", families, warmup=0, repeats=1, batch=(1, 4))
    assert set(times) == {LORA_LABEL, floor_script.NO_ADAPTER, "surm toeplitz, all-linear",
                          "toeplitz's least spectral work", "surm circulant, all-linear",
                          "circulant's least spectral work"}
    assert all(len(samples) == 1 and samples[0] > 0 for samples in times.values())
    text = floor_script.report("tiny", families, times, batch=(1, 4))
    assert "batch 1 x 4 tokens" in text
    assert text.count("\n| toeplitz | ") == 1 and text.count("\n| circulant | ") == 1
