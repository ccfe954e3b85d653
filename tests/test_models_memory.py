"""The training memory estimate against MLX's measured peak of a real LoRA step, and its advice."""

from __future__ import annotations

import pytest

from ft.config.train import TrainConfig
from ft.models.inspect import inspect_folder
from ft.models.memory import estimate_training_memory


def _config(**sections) -> TrainConfig:
    return TrainConfig.model_validate(sections)


def test_estimate_matches_measured_lora_step(smollm2_dir):
    """One LoRA step on SmolLM2 in float32 on CPU (ft's CPU path): estimate within 25% of mx.get_peak_memory()."""
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from ft.models.loading import load_model_dir, on_cpu

    if not on_cpu():
        pytest.skip("the constants were fitted on the CPU path")
    batch, seq = 2, 96
    cfg = _config(
        training={"batch_size": batch, "optimizer": "adamw", "warmup_steps": 0},
        data={"max_seq_length": seq},
        lora={"rank": 8, "target_modules": ["q_proj", "v_proj"]},
    )
    est = estimate_training_memory(inspect_folder(smollm2_dir), cfg, available_bytes=64 * 10**9, on_cpu=True)
    assert est.weights_precision.startswith("float32 (dequantized")
    # 2 modules x 30 layers x rank 8 x (in + out): q 576->576, v 576->192
    assert est.trainable_parameters == 30 * 8 * ((576 + 576) + (576 + 192))

    loaded = load_model_dir(smollm2_dir, dequantize=True)
    model = loaded.model
    model.freeze()
    linear_to_lora_layers(
        model,
        len(model.layers),
        {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
    )
    opt = optim.AdamW(1e-4)
    step = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    x = mx.random.randint(0, 49152, (batch, seq + 1))
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    loss, grads = step(model, x[:, :-1], x[:, 1:])
    opt.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    peak = mx.get_peak_memory()
    ratio = est.total_bytes / peak
    print(f"estimate {est.total_bytes / 1e6:.0f} MB vs measured peak {peak / 1e6:.0f} MB (ratio {ratio:.2f})")
    assert 0.75 < ratio < 1.25


def test_does_not_fit_gives_concrete_advice(smollm2_dir):
    info = inspect_folder(smollm2_dir)
    cfg = _config(training={"batch_size": 8, "grad_accumulation_steps": 2}, data={"max_seq_length": 8192})
    est = estimate_training_memory(info, cfg, available_bytes=8 * 10**9, on_cpu=True)
    assert not est.fits and est.verdict.startswith("does not fit")
    text = " ".join(est.advice)
    assert "data.max_seq_length" in text and "batch_size: 1" in text and "grad_accumulation_steps: 16" in text
    small = _config(training={"batch_size": 1}, data={"max_seq_length": 512})
    ok = estimate_training_memory(info, small, available_bytes=8 * 10**9, on_cpu=True)
    assert ok.fits and ok.total_bytes < est.total_bytes and not ok.advice
