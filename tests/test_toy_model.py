"""The shipped toy video DiT: procedural videos, trained weights with local attention, metrics, training."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_compile.toy.attention_stats import capture_self_attention, local_attention_mass
from sparse_compile.toy.frames import CAPTION_HEIGHT, frame_strip
from sparse_compile.toy.judge import judge, shape_mask
from sparse_compile.toy.metrics import psnr, ssim
from sparse_compile.toy.model import CONFIG, WEIGHTS, build_toy_wan, class_embeddings, compute_dtype
from sparse_compile.toy.sampling import generate, initial_noise, noise_level, noise_levels
from sparse_compile.toy import train as train_module
from sparse_compile.toy.train import main as train_main
from sparse_compile.toy.train import train
from sparse_compile.toy.videos import NUM_CLASSES, make_videos


def test_videos_are_a_pure_function_of_the_seed():
    labels = torch.arange(NUM_CLASSES)
    a = make_videos(3, labels, 4, 16, 24)
    assert a.shape == (NUM_CLASSES, 3, 4, 16, 24)
    assert torch.equal(a, make_videos(3, labels, 4, 16, 24))
    assert not torch.equal(a, make_videos(4, labels, 4, 16, 24))
    assert a.min() >= -1 and a.max() <= 1


def test_videos_move_frame_to_frame():
    video = make_videos(0, torch.tensor([0]), 4, 32, 48)
    assert (video[:, :, 1:] - video[:, :, :-1]).abs().mean() > 0.01


def test_shapes_have_the_same_size_and_speed_in_pixels_at_every_frame_size():
    """The model sees positions only through relative RoPE: a frame's size must not change what a class looks like."""
    labels = torch.arange(NUM_CLASSES)
    small, large = make_videos(3, labels, 6, 32, 48), make_videos(3, labels, 6, 64, 96)
    pixels_per_frame = lambda videos: shape_mask(videos).float().sum((2, 3)).mean(1)  # noqa: E731
    # Equal up to where the pixel grid cuts the edges (a shape scaled with the frame would cover 4x the pixels).
    assert torch.allclose(pixels_per_frame(small), pixels_per_frame(large), rtol=0.1)
    for a, b in zip(judge(small), judge(large)):
        assert a.label == b.label and a.motion == pytest.approx(b.motion, abs=0.4)  # pixels per frame


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="labels"):
        make_videos(0, torch.tensor([NUM_CLASSES]), 2, 16, 16)


def test_class_embeddings_are_fixed_and_the_unconditional_one_is_zero():
    e = class_embeddings(torch.tensor([0, 1, -1]))
    assert torch.equal(e, class_embeddings(torch.tensor([0, 1, -1])))
    assert not torch.equal(e[0], e[1]) and e[2].abs().sum() == 0


def _model_attention(model, frames=4, height=32, width=48):
    labels = torch.tensor([0])
    video = make_videos(7, labels, frames, height, width)
    noisy = 0.5 * video + 0.5 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.tensor([500.0]), encoder_hidden_states=class_embeddings(labels))
    return calls, (frames, height // 2, width // 2)


def test_the_shipped_weights_have_learned_local_attention():
    """Trained: the first layers put many times their share of attention on nearby tokens; random weights don't."""
    trained_calls, grid = _model_attention(build_toy_wan())
    random_calls, _ = _model_attention(build_toy_wan(weights=None))
    assert len(trained_calls) == CONFIG["num_layers"]
    ratio = lambda call: (lambda m, s: m / s)(*local_attention_mass(call.query, call.key, grid))  # noqa: E731
    trained = [ratio(c) for c in trained_calls[:3]]
    random = [ratio(c) for c in random_calls[:3]]
    assert min(trained) > 5 and max(random) < 2, (trained, random)


def test_generation_is_deterministic_in_the_seed_and_finite():
    model = build_toy_wan()
    a = generate(model, torch.tensor([1]), seed=5, frames=2, height=16, width=16, steps=2)
    b = generate(model, torch.tensor([1]), seed=5, frames=2, height=16, width=16, steps=2)
    assert a.shape == (1, 3, 2, 16, 16) and torch.isfinite(a).all() and torch.equal(a, b)


def test_a_bf16_toy_keeps_in_fp32_what_diffusers_keeps_in_fp32_with_the_fp32_values():
    fp32, bf16 = build_toy_wan(), build_toy_wan(dtype=torch.bfloat16)
    weights = dict(fp32.named_parameters())
    kept = {n for n, p in bf16.named_parameters() if p.dtype == torch.float32}
    assert {"scale_shift_table", "blocks.0.scale_shift_table", "blocks.0.norm2.weight",
            "condition_embedder.time_embedder.linear_1.weight"} <= kept  # fmt: skip
    assert all(torch.equal(bf16.get_parameter(n), weights[n]) for n in kept)  # not rounded through bf16
    assert bf16.get_parameter("blocks.0.attn1.to_q.weight").dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for n, b in bf16.named_buffers() if n.startswith("rope."))
    assert compute_dtype(bf16) == (torch.device("cpu"), torch.bfloat16)
    assert compute_dtype(fp32) == (torch.device("cpu"), torch.float32)


def test_generation_keeps_the_latent_in_fp32_and_calls_the_model_in_its_dtype():
    model = build_toy_wan(dtype=torch.bfloat16)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["hidden_states"].dtype),
                                    with_kwargs=True)  # fmt: skip
    video = generate(model, torch.tensor([1]), seed=5, frames=2, height=16, width=16, steps=2)
    assert video.dtype == torch.float32 and torch.isfinite(video).all()
    assert seen == [torch.bfloat16] * 4  # two steps, conditional and unconditional


def test_generation_stopped_at_a_step_returns_the_latent_that_step_starts_from():
    model = build_toy_wan()
    labels = torch.tensor([2])
    start = generate(model, labels, seed=3, frames=2, height=16, width=16, steps=4, until=0)
    assert torch.equal(start, initial_noise(3, (1, 3, 2, 16, 16), "cpu", torch.float32))
    full = generate(model, labels, seed=3, frames=2, height=16, width=16, steps=4)
    assert torch.equal(generate(model, labels, seed=3, frames=2, height=16, width=16, steps=4, until=4), full)
    assert noise_level(0, 4) == 1.0 and noise_level(1, 4) == 0.75
    with pytest.raises(ValueError, match="until"):
        generate(model, labels, seed=3, frames=2, height=16, width=16, steps=4, until=5)


def test_psnr_and_ssim():
    video = make_videos(0, torch.arange(2), 2, 16, 16)
    assert torch.isinf(psnr(video, video)).all()
    assert torch.allclose(ssim(video, video), torch.ones(2))
    # A uniform error of 0.2 (in [-1, 1] units) has MSE 0.04: PSNR = 10 log10(4 / 0.04) = 20 dB.
    shifted = torch.full((1, 3, 1, 16, 16), 0.1)
    assert psnr(shifted, shifted - 0.2).item() == pytest.approx(20.0, abs=1e-4)
    # Constant frames: SSIM reduces to its luminance term (2 a b + C1) / (a^2 + b^2 + C1) on [0, 1] values.
    a, b = 0.3, 0.6
    expected = (2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2)
    value = ssim(torch.full((1, 3, 1, 16, 16), 2 * a - 1), torch.full((1, 3, 1, 16, 16), 2 * b - 1))
    assert value.item() == pytest.approx(expected, rel=1e-4)
    noisy = video + 0.3 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    assert (ssim(noisy, video) < 0.9).all() and (psnr(noisy, video) < 20).all()


def test_frame_strip_has_one_captioned_row_per_video_and_one_column_per_frame():
    videos = {"dense": make_videos(0, torch.tensor([0]), 4, 16, 24), "sparse": make_videos(1, torch.tensor([0]), 4, 16, 24)}
    image = frame_strip(videos, frames=[0, 2, 3], zoom=2)
    assert image.size == (3 * 24 * 2, 2 * (16 * 2 + CAPTION_HEIGHT))
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32).view(image.height, image.width, 3)
    assert pixels[:CAPTION_HEIGHT].amax() > 200  # the caption's white text on black
    second_row = pixels[2 * CAPTION_HEIGHT + 32:, :48]  # frame 0 of "sparse", zoomed 2x
    expected = ((videos["sparse"][0, :, 0] + 1) * 127.5).round().permute(1, 2, 0)
    assert torch.equal(second_row[::2, ::2], expected)


def test_a_training_batch_weights_the_shapes_pixels_and_draws_mid_noise_levels_most():
    from sparse_compile.toy.train import SHAPE_CHROMA, SHAPE_LOSS_WEIGHT, training_batch

    batch = training_batch(step=3, sizes=((4, 32, 48, 64),), device=torch.device("cpu"), seed=1)
    sigma = (batch.timesteps / 1000).view(-1, 1, 1, 1, 1)
    clean = batch.noisy - sigma * batch.target  # x_sigma = (1 - sigma) x + sigma n and target = n - x
    chroma = clean.amax(dim=1, keepdim=True) - clean.amin(dim=1, keepdim=True)
    assert torch.equal(batch.loss_weight, 1 + SHAPE_LOSS_WEIGHT * (chroma > SHAPE_CHROMA).float())
    assert 0.01 < float((batch.loss_weight > 1).float().mean()) < 0.3, "shapes are a small part of each frame"
    assert float(((sigma > 0.25) & (sigma < 0.75)).float().mean()) > 0.55  # logit-normal: ~0.73 in the middle half


def test_a_uniform_noise_share_trains_the_nearly_clean_and_nearly_pure_noise_ends():
    from sparse_compile.toy.train import training_batch

    def ends(uniform_noise: float) -> float:
        levels = torch.cat([training_batch(step, ((1, 16, 16, 256),), torch.device("cpu"), 0, uniform_noise).timesteps
                            for step in range(4)]) / 1000
        return float(((levels < 0.1) | (levels > 0.9)).float().mean())

    assert ends(0.0) < 0.06  # logit-normal: ~2.8% of the clips beyond 0.1 of either end
    assert 0.06 < ends(0.5) < 0.16  # half of them uniform: ~0.5 * 20% + 0.5 * 2.8%
    assert torch.equal(training_batch(5, ((1, 16, 16, 8),), torch.device("cpu"), 0, 0.5).noisy,
                       training_batch(5, ((1, 16, 16, 8),), torch.device("cpu"), 0, 0.5).noisy)


def test_training_resumes_from_its_checkpoint_and_writes_fp16_weights_that_load(tmp_path):
    tiny = dict(sizes=((2, 16, 16, 2),), eval_sizes=((2, 16, 16, 1),), eval_clips=1, locality_size=(2, 16, 16),
                device=torch.device("cpu"))
    first = train(1.0, tmp_path / "a", max_steps=2, checkpoint=tmp_path / "state.pt", attention_entropy=0.03, **tiny)
    assert first["steps"] == 2 and all(torch.isfinite(torch.tensor(loss)) for _, _, loss in first["losses"])
    assert first["attention_entropy_weight"] == 0.03 and all(0 < e < 1 for _, e in first["attention_entropy"])
    assert len(first["locality"]) == CONFIG["num_layers"] and len(first["scores"]) == 1
    assert first["runs"][-1]["steps"] == 2 and first["runs"][-1]["device"] == "cpu"
    second = train(1.0, tmp_path / "b", resume=tmp_path / "state.pt", max_steps=1, **tiny)
    assert second["start_step"] == first["start_step"] + 2
    assert second["runs"][:-1] == first["runs"] and second["runs"][-1]["steps"] == 1
    assert json.loads((tmp_path / "b" / "train_log.json").read_text())["steps"] == 1
    model = build_toy_wan(weights=tmp_path / "b" / "toy_wan.safetensors")
    assert next(model.parameters()).dtype == torch.float32


def test_training_saves_weights_every_save_every_minutes_and_resumes_from_the_weights_file(tmp_path, monkeypatch):
    import sparse_compile.toy.train as train_module

    tiny = dict(sizes=((2, 16, 16, 2),), eval_sizes=((2, 16, 16, 1),), eval_clips=1, locality_size=(2, 16, 16),
                device=torch.device("cpu"))
    saves = []
    real_save = train_module._save_weights
    monkeypatch.setattr(train_module, "_save_weights", lambda *args: saves.append(args[3]) or real_save(*args))
    first = train(1.0, tmp_path / "a", resume=None, max_steps=3, save_every=1e-9, **tiny)
    assert saves == [1, 2, 3, 3]  # after each step (the budget check runs before each step's save), then at the end
    second = train(1.0, tmp_path / "b", resume=tmp_path / "a" / "toy_wan.safetensors", max_steps=1, **tiny)
    assert second["start_step"] == 3 and second["runs"][:-1] == first["runs"]
    assert not list((tmp_path / "a").glob("*.partial"))


def test_the_training_cli_refuses_without_a_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path)])
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["16x64x96", "16x64x95:2", "0x32x48:4", "16x64x96:two"])
def test_the_training_cli_names_a_bad_size_entry(monkeypatch, capsys, tmp_path, entry):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path), "--sizes", entry])
    err = capsys.readouterr().err
    assert "--sizes" in err and repr(entry) in err


def test_the_training_cli_passes_its_sizes_in_order(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    log = {"locality": [], "steps": 0, "minutes": 0.0, "total_minutes": 0.0, "losses": [(0, 0.0, 0.0)]}
    monkeypatch.setattr(train_module, "train", lambda *args, **kwargs: seen.update(kwargs) or log)
    train_main(["--out", str(tmp_path), "--sizes", "16x64x96:2", "6x32x48:24", "--attention-entropy", "0.03",
                "--qk-gain-lr", "10", "--uniform-noise", "0.25"])
    assert seen["sizes"] == ((16, 64, 96, 2), (6, 32, 48, 24)) and seen["attention_entropy"] == 0.03
    assert seen["qk_gain_lr"] == 10 and seen["uniform_noise"] == 0.25


def test_the_q_and_k_gains_of_each_self_attention_train_at_their_own_learning_rate(tmp_path):
    model = build_toy_wan(weights=None)
    rest, gains = train_module.parameter_groups(model, qk_gain_lr=10.0)
    assert gains["lr_scale"] == 10.0 and rest["lr_scale"] == 1.0
    assert len(gains["params"]) == 2 * CONFIG["num_layers"]  # norm_q and norm_k of every layer's attn1
    assert len(gains["params"]) + len(rest["params"]) == len(list(model.parameters()))
    captured = {}
    real_step = torch.optim.AdamW.step
    def step(optimizer, *args, **kwargs):
        captured["lr"] = [group["lr"] for group in optimizer.param_groups]
        return real_step(optimizer, *args, **kwargs)
    tiny = dict(sizes=((2, 16, 16, 2),), eval_sizes=((2, 16, 16, 1),), eval_clips=1, locality_size=(2, 16, 16),
                device=torch.device("cpu"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        log = train(1.0, tmp_path, resume=None, max_steps=1, qk_gain_lr=10.0, **tiny)
    assert log["qk_gain_lr"] == 10.0 and captured["lr"][1] == pytest.approx(10 * captured["lr"][0])
    assert log["runs"][-1]["recipe"]["qk_gain_lr"] == 10.0  # the weights' metadata says how they were trained


@pytest.mark.parametrize("option, value", [("--attention-entropy", "-1"), ("--qk-gain-lr", "0"),
                                           ("--uniform-noise", "1.5"), ("--uniform-noise", "nan")])
def test_the_training_cli_names_an_option_out_of_range(monkeypatch, capsys, tmp_path, option, value):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit):
        train_main(["--out", str(tmp_path), option, value])
    assert option in capsys.readouterr().err


def test_a_shifted_schedule_spends_more_steps_at_high_noise_between_the_same_ends():
    linear, shifted = noise_levels(20), noise_levels(20, shift=3.0)
    assert torch.equal(linear, torch.linspace(1.0, 0.0, 21))
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and bool((shifted.diff() < 0).all())
    assert bool((shifted[1:-1] > linear[1:-1]).all())
    assert noise_level(5, 20, shift=3.0) == float(shifted[5])
    with pytest.raises(ValueError, match="shift must be >= 1"):
        noise_levels(20, shift=0.5)


def test_the_shipped_weights_are_fp16_and_at_most_40_mib():
    from safetensors import safe_open

    with safe_open(str(WEIGHTS), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float16}
    assert WEIGHTS.stat().st_size <= 40 * 2**20
