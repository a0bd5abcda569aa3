"""Train the toy video DiT on one CUDA GPU: ``python -m sparse_compile.toy.train --minutes 5 --out DIR``.

Flow matching on procedural videos (:mod:`sparse_compile.toy.videos`), drawn fresh every step
from the seed and the step number, at a mix of sizes so the model serves several grids. Noise
levels are logit-normal (most steps at mid noise, where the shapes and their motion are decided),
and the shapes' pixels weigh ``1 + SHAPE_LOSS_WEIGHT`` in the loss, since they carry the class but
cover a few percent of a frame. With ``--attention-entropy W`` the loss also carries ``W`` times the
normalised entropy of sampled query rows of every self-attention
(:mod:`sparse_compile.toy.attention_penalty`), which concentrates the attention; ``--qk-gain-lr`` lets
the q/k RMSNorm gains, which bound how sharp it can get, move faster. bf16 autocast,
AdamW with warm-up and cosine decay over the time budget, classifier-free-guidance label dropout,
an EMA of the weights.

Training resumes by default from the shipped weights (``--resume``: a ``.safetensors`` file or a
checkpoint written by ``--checkpoint``). Written to ``--out``: the EMA as fp16 safetensors
(with the cumulative training minutes and steps in its metadata) and ``train_log.json`` (loss
curve, the judge's accuracy on sampled clips, attention locality per layer).

The run is reproducible from the seed and the number of steps (``--max-steps``); with a time
budget alone the step count depends on the GPU. The CLI refuses to train without CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparse_compile.cli_types import number_in
from sparse_compile.toy.attention_penalty import attention_entropy_penalty
from sparse_compile.toy.attention_stats import capture_self_attention, local_attention_mass
from sparse_compile.toy.evaluate import score_generation
from sparse_compile.toy.model import WEIGHTS, build_toy_wan, class_embeddings
from sparse_compile.toy.videos import DATA_VERSION, NUM_CLASSES, make_videos

# (frames, height, width, batch): about 55k tokens per batch each.
TRAIN_SIZES = ((6, 32, 48, 24), (9, 32, 48, 16), (13, 48, 64, 6), (16, 64, 96, 2))
# (frames, height, width, sampling steps): the demo's CPU and GPU settings.
EVAL_SIZES = ((6, 32, 48, 6), (16, 64, 96, 20))
LABEL_DROPOUT = 0.1
SHAPE_LOSS_WEIGHT = 4.0
SHAPE_CHROMA = 0.8  # between the shapes' chroma (>= 1.6) and the background's (<= 0.15)
EMA_DECAY = 0.999
LOG_EVERY = 50
PENALTY_ROWS = 64  # query rows per (batch, head) and self-attention call in the entropy penalty
RECIPE_KEYS = ("seed", "peak_lr", "sizes", "attention_entropy_weight", "qk_gain_lr", "uniform_noise")
"""What each run's record in the weights' metadata keeps of its log, besides device, minutes, steps and data."""
QK_GAIN_SUFFIXES = ("attn1.norm_q.weight", "attn1.norm_k.weight")  # self-attention's temperature, per channel


@dataclass
class TrainState:
    """Everything a resumed run continues from: weights, EMA, optimizer, global step, past runs."""

    model: torch.nn.Module
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: int = 0
    runs: list[dict] = field(default_factory=list)  # {"device", "minutes", "steps"} per earlier run


def learning_rate(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass(frozen=True)
class TrainingBatch:
    """One step's inputs and targets: videos ``(N, 3, F, H, W)``, timesteps ``(N,)``, conditioning
    ``(N, TEXT_TOKENS, TEXT_DIM)``, velocity targets like the videos and per-pixel loss weights ``(N, 1, F, H, W)``."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    conditioning: torch.Tensor
    target: torch.Tensor
    loss_weight: torch.Tensor


def training_batch(
    step: int, sizes: tuple[tuple[int, int, int, int], ...], device: torch.device, seed: int = 0,
    uniform_noise: float = 0.0,
) -> TrainingBatch:
    """The batch of step ``step`` of a run with ``seed``: logit-normal noise levels (each clip's level
    uniform in (0, 1) instead with probability ``uniform_noise``, so the nearly clean and nearly pure
    noise ends that a sampler's first and last steps visit are trained too), shape pixels weighted
    ``1 + SHAPE_LOSS_WEIGHT``.

    ``sizes`` lists ``(frames, height, width, batch)``; step ``i`` uses entry ``i % len(sizes)``.
    """
    step_seed = seed * 10**9 + step
    gen = torch.Generator().manual_seed(step_seed)
    frames, height, width, batch = sizes[step % len(sizes)]
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    videos = make_videos(step_seed, labels, frames, height, width, device)
    noise = torch.randn(videos.shape, generator=gen).to(device)
    sigma = torch.sigmoid(torch.randn((batch,), generator=gen))
    if uniform_noise > 0:
        uniform = torch.rand((batch,), generator=gen)
        sigma = torch.where(torch.rand((batch,), generator=gen) < uniform_noise, uniform, sigma)
    sigma = sigma.to(device)
    noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * videos + sigma.view(-1, 1, 1, 1, 1) * noise
    dropped = torch.rand((batch,), generator=gen) < LABEL_DROPOUT
    conditioning = class_embeddings(torch.where(dropped, -1, labels)).to(device)
    chroma = videos.amax(dim=1, keepdim=True) - videos.amin(dim=1, keepdim=True)
    loss_weight = 1 + SHAPE_LOSS_WEIGHT * (chroma > SHAPE_CHROMA).float()
    return TrainingBatch(noisy, sigma * 1000, conditioning, noise - videos, loss_weight)


def attention_locality(
    model: torch.nn.Module, video_size: tuple[int, int, int], device: torch.device
) -> list[dict[str, float]]:
    """Per layer: attention mass near the query vs the near keys' share, at mid noise, on two videos
    of ``video_size`` (frames, height, width)."""
    frames, height, width = video_size
    labels = torch.arange(2) % NUM_CLASSES
    videos = make_videos(10**6, labels, frames, height, width, device)
    noisy = 0.5 * videos + 0.5 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), training_autocast(device), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.full((2,), 500.0, device=device),
              encoder_hidden_states=class_embeddings(labels).to(device))
    grid = (frames, height // 2, width // 2)
    stats = []
    for call in calls:
        mass, share = local_attention_mass(call.query, call.key, grid)
        stats.append({"near_mass": mass, "near_share": share, "ratio": mass / share})
    return stats


def training_autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; none on the CPU (where bf16 matmuls are slow)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def parameter_groups(model: torch.nn.Module, qk_gain_lr: float) -> list[dict]:
    """AdamW groups: self-attention's q/k RMSNorm gains (they scale every logit, so they set how sharp
    the attention can be) with ``lr_scale`` ``qk_gain_lr``, and every other trainable parameter at 1."""
    gains, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (gains if name.endswith(QK_GAIN_SUFFIXES) else rest).append(param)
    return [{"params": rest, "lr_scale": 1.0}, {"params": gains, "lr_scale": qk_gain_lr}]


def load_state(resume: Path | None, device: torch.device, peak_lr: float, prior_minutes: float,
               qk_gain_lr: float = 1.0) -> TrainState:
    """A :class:`TrainState` from ``resume``: a checkpoint file of :func:`save_checkpoint`, a
    ``.safetensors`` weights file (EMA and model both start from it), or ``None`` (random init).

    ``prior_minutes`` is the training time of weights whose metadata does not record it; ``qk_gain_lr``
    multiplies the learning rate of the q/k gains (:func:`parameter_groups`).
    """
    from safetensors import safe_open

    is_weights = resume is not None and resume.suffix == ".safetensors"
    model = build_toy_wan(device, torch.float32, weights=resume if is_weights else None).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, qk_gain_lr), lr=peak_lr, betas=(0.9, 0.99),
                                  weight_decay=0.01)
    state = TrainState(model, {k: v.detach().clone() for k, v in model.state_dict().items()}, optimizer)
    if resume is None:
        return state
    if is_weights:
        with safe_open(str(resume), "pt") as weights:
            meta = weights.metadata() or {}
        runs = json.loads(meta["runs"]) if "runs" in meta else [{"device": "unrecorded", "minutes": prior_minutes,
                                                                  "steps": None}]
        state.runs, state.step = runs, int(meta.get("steps", 0))
        return state
    saved = torch.load(resume, map_location=device, weights_only=True)
    model.load_state_dict(saved["model"])
    scales = [group["lr_scale"] for group in optimizer.param_groups]  # this run's choice, not the checkpoint's
    optimizer.load_state_dict(saved["optimizer"])
    for group, lr_scale in zip(optimizer.param_groups, scales):
        group["lr_scale"] = lr_scale
    state.ema = {k: v.to(device) for k, v in saved["ema"].items()}
    state.step, state.runs = saved["step"], json.loads(saved["runs"])
    return state


def save_checkpoint(state: TrainState, path: Path) -> None:
    """Everything :func:`load_state` needs to continue, as one ``torch.save`` file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(), "ema": state.ema,
                "step": state.step, "runs": json.dumps(state.runs)}, path)


def train(
    minutes: float,
    out: Path,
    resume: Path | None = WEIGHTS,
    checkpoint: Path | None = None,
    peak_lr: float = 3e-4,
    seed: int = 0,
    sizes: tuple[tuple[int, int, int, int], ...] = TRAIN_SIZES,
    max_steps: int | None = None,
    eval_sizes: tuple[tuple[int, int, int, int], ...] = EVAL_SIZES,
    eval_clips: int = 32,
    score_start: bool = False,
    locality_size: tuple[int, int, int] = (16, 64, 96),
    prior_minutes: float = 0.0,
    save_every: float | None = None,
    attention_entropy: float = 0.0,
    qk_gain_lr: float = 1.0,
    uniform_noise: float = 0.0,
    device: torch.device | None = None,
) -> dict:
    """Train for ``minutes`` (or ``max_steps``) from ``resume``; write weights and log to ``out``.

    ``eval_sizes`` lists ``(frames, height, width, steps)`` at which ``eval_clips`` sampled clips
    are judged at the end (and at the start with ``score_start``). With ``save_every`` (minutes),
    the EMA weights and the log are also written every ``save_every`` minutes of the run.
    ``attention_entropy`` weighs the attention-entropy penalty (0: off; its mean is logged either way);
    ``qk_gain_lr`` multiplies the learning rate of self-attention's q/k gains; ``uniform_noise`` is the share
    of clips whose noise level is uniform (:func:`training_batch`).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(seed)
    state = load_state(resume, device, peak_lr, prior_minutes, qk_gain_lr)
    model, params = state.model, [p for p in state.model.parameters() if p.requires_grad]
    log: dict = {"resumed_from": str(resume), "start_step": state.step, "seed": seed, "peak_lr": peak_lr,
                 "sizes": [list(size) for size in sizes],
                 "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "attention_entropy_weight": attention_entropy,
                 "qk_gain_lr": qk_gain_lr, "uniform_noise": uniform_noise, "losses": [],
                 "attention_entropy": []}
    if score_start:
        log["start_scores"] = _score(_ema_model(model, state.ema), eval_sizes, eval_clips)
    budget, start, run_steps, window, entropy_window = minutes * 60, time.perf_counter(), 0, [], []
    next_save = None if save_every is None else save_every * 60
    while (elapsed := time.perf_counter() - start) < budget and (max_steps is None or run_steps < max_steps):
        lr = learning_rate(elapsed / budget, run_steps, peak_lr, warmup=100)
        for group in state.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        batch = training_batch(state.step, sizes, device, seed, uniform_noise)
        rows = torch.Generator().manual_seed(seed * 10**9 + state.step)
        penalty = attention_entropy_penalty(PENALTY_ROWS, rows, grad=attention_entropy > 0)
        with training_autocast(device), penalty as entropies:
            prediction = model(hidden_states=batch.noisy, timestep=batch.timesteps,
                               encoder_hidden_states=batch.conditioning).sample
        loss = (batch.loss_weight * (prediction.float() - batch.target) ** 2).mean()
        entropy = torch.stack(entropies).mean()
        state.optimizer.zero_grad(set_to_none=True)
        (loss + attention_entropy * entropy if attention_entropy else loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        state.optimizer.step()
        decay = min(EMA_DECAY, (1 + run_steps) / (10 + run_steps))
        with torch.no_grad():
            current = model.state_dict()
            torch._foreach_lerp_(list(state.ema.values()), [current[k] for k in state.ema], 1 - decay)
        window.append(loss.detach())
        entropy_window.append(entropy.detach())
        state.step, run_steps = state.step + 1, run_steps + 1
        if run_steps % LOG_EVERY == 0 or run_steps == 1:
            mean_loss, mean_entropy = float(torch.stack(window).mean()), float(torch.stack(entropy_window).mean())
            window, entropy_window = [], []
            log["losses"].append((state.step, round(time.perf_counter() - start, 1), mean_loss))
            log["attention_entropy"].append((state.step, mean_entropy))
            print(f"step {state.step} ({run_steps} this run) {log['losses'][-1][1]:.0f}s loss {mean_loss:.4f} "
                  f"attention entropy {mean_entropy:.3f}", flush=True)
        if next_save is not None and elapsed >= next_save:
            next_save += save_every * 60
            _save_weights(state, log, out, run_steps, (time.perf_counter() - start) / 60)
    run_minutes = (time.perf_counter() - start) / 60
    state.runs = _save_weights(state, log, out, run_steps, run_minutes)
    if checkpoint is not None:
        save_checkpoint(state, checkpoint)
    ema_model = _ema_model(model, state.ema)
    log["scores"] = _score(ema_model, eval_sizes, eval_clips)
    log["locality"] = attention_locality(ema_model, locality_size, device)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _save_weights(state: TrainState, log: dict, out: Path, run_steps: int, run_minutes: float) -> list[dict]:
    """Write the EMA as fp16 ``out/toy_wan.safetensors`` and ``out/train_log.json``, each replaced whole (a
    reader never sees half a file); returns the runs list with this run so far appended."""
    from safetensors.torch import save_file

    runs = state.runs + [{"device": log["device"], "minutes": round(run_minutes, 2), "steps": run_steps,
                          "data": DATA_VERSION, "recipe": {key: log[key] for key in RECIPE_KEYS}}]
    log.update(steps=run_steps, minutes=round(run_minutes, 2), runs=runs,
               total_minutes=round(sum(r["minutes"] for r in runs), 2))
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "toy_wan.safetensors.partial"
    save_file({k: v.half().contiguous() for k, v in state.ema.items()}, str(partial),
              metadata={"runs": json.dumps(runs), "steps": str(state.step)})
    partial.replace(out / "toy_wan.safetensors")
    partial_log = out / "train_log.json.partial"
    partial_log.write_text(json.dumps(log, indent=1))
    partial_log.replace(out / "train_log.json")
    return runs


def _ema_model(model: torch.nn.Module, ema: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``model`` in eval mode holding the ``ema`` weights."""
    copy = deepcopy(model).eval()
    copy.load_state_dict(ema)
    return copy


def _score(model: torch.nn.Module, eval_sizes: tuple[tuple[int, int, int, int], ...], clips: int) -> list[dict]:
    """Judge ``clips`` clips sampled from ``model`` at each ``(frames, height, width, steps)`` of ``eval_sizes``."""
    scores = []
    for frames, height, width, steps in eval_sizes:
        with training_autocast(next(model.parameters()).device):
            score = score_generation(model, frames, height, width, steps, clips).as_dict()
        print(f"judge accuracy {frames}x{height}x{width}, {steps} steps: {score['accuracy']:.3f} "
              f"(shapes found in {score['found']:.3f})", flush=True)
        scores.append(score)
    return scores


def size_entry(text: str, count: str = "BATCH") -> tuple[int, int, int, int]:
    """``FxHxW:N`` (frames, even height and width in pixels, a positive count: the batch here, the
    sampling steps for an evaluation size) -> ``(F, H, W, N)``; ``argparse.ArgumentTypeError`` (naming
    ``count``) otherwise."""
    try:
        grid, number = text.split(":")
        frames, height, width = (int(x) for x in grid.split("x"))
        entry = (frames, height, width, int(number))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FRAMESxHEIGHTxWIDTH:{count} such as 16x64x96:2, got {text!r}"
        ) from None
    if min(entry) <= 0 or height % 2 or width % 2:
        raise argparse.ArgumentTypeError(f"sizes must be positive with even height and width, got {text!r}")
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = number_in(float, 0, low_open=True)
    parser.add_argument("--minutes", type=positive, default=5.0, help="training time budget")
    parser.add_argument("--out", type=Path, required=True, help="folder for toy_wan.safetensors and train_log.json")
    parser.add_argument("--resume", type=Path, default=WEIGHTS,
                        help="weights (.safetensors) or a --checkpoint file to continue from (default: shipped weights)")
    parser.add_argument("--from-scratch", action="store_true", help="random initial weights instead of --resume")
    parser.add_argument("--checkpoint", type=Path, help="also save the full training state here")
    parser.add_argument("--lr", type=positive, default=3e-4, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=number_in(int, 1),
                        help="stop after this many steps (reproducible runs)")
    parser.add_argument("--eval-clips", type=number_in(int, 1), default=32, help="sampled clips judged per eval size")
    parser.add_argument("--score-start", action="store_true", help="also judge the starting weights")
    parser.add_argument("--save-every", type=positive,
                        help="also write the weights and log every this many minutes of the run")
    parser.add_argument("--sizes", type=size_entry, nargs="+", default=list(TRAIN_SIZES),
                        help="training sizes FxHxW:B, one per step in turn (default: "
                             + " ".join(f"{f}x{h}x{w}:{b}" for f, h, w, b in TRAIN_SIZES) + ")")
    parser.add_argument("--attention-entropy", type=number_in(float, 0), default=0.0,
                        help="weight of the sampled rows' normalised attention entropy in the loss "
                             "(concentrates the attention; default 0: off)")
    parser.add_argument("--qk-gain-lr", type=positive, default=1.0,
                        help="learning-rate multiplier of self-attention's q/k RMSNorm gains, which bound "
                             "how sharp the attention can be (default 1)")
    parser.add_argument("--uniform-noise", type=number_in(float, 0, 1), default=0.0,
                        help="share of clips whose noise level is drawn uniformly instead of logit-normal "
                             "(trains the sampler's first and last steps; default 0)")
    parser.add_argument("--prior-minutes", type=float, default=0.0,
                        help="training minutes of --resume weights that do not record them")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("training needs a CUDA GPU and none is available (one step at the largest training size "
                     "takes minutes and tens of GB on a CPU)")
    if not args.from_scratch and not args.resume.exists():
        parser.error(f"--resume: no such file {args.resume}")
    log = train(args.minutes, args.out, None if args.from_scratch else args.resume, args.checkpoint, args.lr,
                args.seed, sizes=tuple(args.sizes), max_steps=args.max_steps, eval_clips=args.eval_clips,
                score_start=args.score_start,
                prior_minutes=args.prior_minutes, save_every=args.save_every,
                attention_entropy=args.attention_entropy, qk_gain_lr=args.qk_gain_lr,
                uniform_noise=args.uniform_noise)
    ratios = ", ".join(f"{s['ratio']:.1f}" for s in log["locality"])
    print(f"{log['steps']} steps in {log['minutes']} min ({log['total_minutes']} min in all); final loss "
          f"{log['losses'][-1][2]:.4f}; attention near-mass / near-share per layer: {ratios}")


if __name__ == "__main__":
    main()
