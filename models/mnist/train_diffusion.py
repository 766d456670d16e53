"""Train the embedded class-conditional MNIST diffusion models (`mnist`, `mnist-flow`).

    python -m models.mnist.train_diffusion --steps 8000            # CPU or GPU, resumes by default
    python -m models.mnist.train_diffusion --objective flow --init-from models/builtin/mnist \
        --out models/builtin/mnist-flow --work .train/mnist-flow --steps 3000

A diffusers `UNet2DModel` (models/mnist/architecture.py) learns one of two objectives:
- `epsilon` (the `mnist` model): epsilon on the DDPM linear schedule, timestep k in 0..999;
- `flow` (`mnist-flow`): rectified flow, x_t = (1 - t) x0 + t eps with t ~ U(0, 1), the network
  predicts the velocity v = eps - x0 and takes t * 1000 as its timestep (diffusers'
  FlowMatchEulerDiscreteScheduler convention; models/flow.py maps it onto the EDM sigma ODE).
Labels are dropped to the null class with probability --label-dropout so that
classifier-free guidance works. Everything random is a function of (--seed, step): the data order
of epoch e comes from a generator seeded with (seed, e), the noise, timesteps and label dropout of
step k from one seeded with (seed, k). So a run that stops and resumes gives the same weights as
one that never stopped.

Two kinds of output:
- the training state (raw weights, EMA weights, AdamW moments, step, wall time) in
  --work/state.safetensors, every --checkpoint-every steps, written atomically; --resume (the
  default) continues from it exactly;
- the shipped model: the EMA weights in diffusers layout (unet/, scheduler/, model_index.json) plus
  training.json and the model card README.md, in --out every --export-every steps and at the end.
  `--init-from DIR` starts from such an exported model (EMA weights as both raw and EMA, fresh
  optimizer moments) when the training state is not at hand, e.g. on another machine. From a model
  of the other objective (the `mnist` eps weights as the start of `mnist-flow`) the step count
  starts at 0: the weights are only an initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import UNet2DModel
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor
from tqdm import tqdm

import provenance
from models.mnist import card, data
from models.mnist.architecture import (
    FLOW_SCHEDULER_CONFIG,
    NULL_CLASS,
    SCHEDULER_CONFIG,
    UNET_CONFIG,
    count_parameters,
)

OBJECTIVES = ("epsilon", "flow")
# The shipped name of each objective's model: its default --out / --work folders and its card title.
MODEL_NAMES = {"epsilon": "mnist", "flow": "mnist-flow"}
STATE_FILE = "state.safetensors"


def default_out(objective: str) -> Path:
    return data.REPO_ROOT / "models" / "builtin" / MODEL_NAMES[objective]


def default_work(objective: str) -> Path:
    return data.REPO_ROOT / ".train" / MODEL_NAMES[objective]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    ema_decay: float
    label_dropout: float
    grad_clip: float
    seed: int
    objective: str = "epsilon"

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _saved_objective(config: dict[str, Any]) -> str:
    # States and exports from before the flow objective existed are epsilon models.
    return str(config.get("objective", "epsilon"))


def _noise_schedule(device: torch.device) -> tuple[Tensor, Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) of the DDPM linear schedule, float32, shape (T,)."""
    cfg = SCHEDULER_CONFIG
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
    abar = torch.cumprod(1.0 - betas, 0)
    return abar.sqrt().float().to(device), (1.0 - abar).sqrt().float().to(device)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _batches(count: int, batch_size: int, seed: int, start_step: int) -> Iterator[tuple[int, Tensor]]:
    """(step, indices) from start_step on; epoch e is a permutation seeded by (seed, e), with the
    incomplete last batch of each epoch dropped."""
    per_epoch = count // batch_size
    step = start_step
    while True:
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for k in range(position, per_epoch):
            yield step, order[k * batch_size : (k + 1) * batch_size]
            step += 1


def _learning_rate(config: TrainConfig, step: int) -> float:
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def _ema_decay(config: TrainConfig, step: int) -> float:
    # Short memory at the start, so the EMA is not an average of the random initialisation.
    return min(config.ema_decay, (1.0 + step) / (10.0 + step))


def save_state(
    path: Path,
    model: UNet2DModel,
    ema: UNet2DModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    wall_seconds: float,
    config: TrainConfig,
) -> None:
    """The whole training state in one safetensors file, replaced atomically."""
    tensors: dict[str, Tensor] = {}
    for name, value in model.state_dict().items():
        tensors[f"model.{name}"] = value.detach().cpu().contiguous()
    for name, value in ema.state_dict().items():
        tensors[f"ema.{name}"] = value.detach().cpu().contiguous()
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"step": str(step), "wall_seconds": repr(wall_seconds), "config": json.dumps(config.as_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def load_state(
    path: Path, model: UNet2DModel, ema: UNet2DModel, optimizer: torch.optim.Optimizer
) -> tuple[int, float, dict[str, Any]]:
    """Restore what `save_state` wrote; returns (step, wall_seconds, config)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    saved = optimizer.state_dict()
    saved["state"] = state
    optimizer.load_state_dict(saved)
    return int(metadata["step"]), float(metadata["wall_seconds"]), json.loads(metadata["config"])


def export(out: Path, ema: UNet2DModel, info: dict[str, Any]) -> None:
    """The EMA weights in diffusers pipeline layout, training.json and the model card.

    The scheduler config says what the UNet predicts: a DDPMScheduler (epsilon on its betas) or a
    FlowMatchEulerDiscreteScheduler (velocity, timestep = t * num_train_timesteps).
    """
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    ema.save_pretrained(out / "unet", safe_serialization=True)
    scheduler: DDPMScheduler | FlowMatchEulerDiscreteScheduler
    if _saved_objective(info["config"]) == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)
    else:
        scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    scheduler.save_pretrained(out / "scheduler")
    index = {
        # The UNet-and-scheduler pipeline class: its loop (unet(x, t), scheduler.step) is the same
        # for either scheduler; the class labels are what diffusers' pipeline cannot pass.
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", type(scheduler).__name__],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    # A quality record measured other weights (an earlier export of a resumed run): the card says
    # "not measured" until `bench model-card` measures these.
    (out / "quality.json").unlink(missing_ok=True)
    card.write_diffusion_card(out)


def train(args: argparse.Namespace) -> Path:
    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        label_dropout=args.label_dropout,
        grad_clip=args.grad_clip,
        seed=args.seed,
        objective=args.objective,
    )
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_set = data.load(args.split, args.data)
    images = train_set.scaled().to(device)
    labels = train_set.labels.to(device)

    torch.manual_seed(config.seed)
    model = UNet2DModel(**UNET_CONFIG).to(device)
    ema = UNet2DModel(**UNET_CONFIG).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)

    state_path = args.work / STATE_FILE
    start, wall = 0, 0.0
    if args.resume and state_path.is_file():
        start, wall, saved = load_state(state_path, model, ema, optimizer)
        saved = {**saved, "objective": _saved_objective(saved)}
        changed = {k: (saved.get(k), v) for k, v in config.as_dict().items() if k != "steps" and saved.get(k) != v}
        if changed:
            raise SystemExit(
                f"{state_path} was trained with other settings {changed}; use another --work or --no-resume"
            )
        print(f"resuming from {state_path} at step {start}", file=sys.stderr)
    elif args.init_from is not None:
        weights = UNet2DModel.from_pretrained(args.init_from, subfolder="unet", use_safetensors=True)
        model.load_state_dict(weights.state_dict())
        ema.load_state_dict(weights.state_dict())
        exported = json.loads((args.init_from / "training.json").read_text(encoding="utf-8"))
        same = _saved_objective(exported.get("config", {})) == config.objective
        # Another objective's weights are an initialisation: the schedule (warm-up, EMA, data
        # order) starts from step 0.
        start = exported["step"] if same else 0
        print(
            f"starting from the exported EMA weights in {args.init_from} (step {start}, fresh optimizer"
            f"{'' if same else ', trained for ' + _saved_objective(exported.get('config', {}))})",
            file=sys.stderr,
        )

    alpha, sigma_vp = _noise_schedule(device)
    timesteps = alpha.numel()
    flow_timesteps = float(FLOW_SCHEDULER_CONFIG["num_train_timesteps"])
    model.train()
    began = time.perf_counter()
    info: dict[str, Any] = {}
    losses: list[float] = []
    progress = tqdm(
        total=config.steps,
        initial=start,
        desc=MODEL_NAMES[config.objective],
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    for step, index in _batches(len(train_set), config.batch_size, config.seed, start):
        if step >= config.steps:
            break
        generator = _step_generator(config.seed, step)
        x0 = images[index]
        y = labels[index].clone()
        noise = torch.randn(x0.shape, generator=generator).to(device)
        if config.objective == "flow":
            t_flow = torch.rand(x0.shape[0], generator=generator, dtype=torch.float64).to(device)
        else:
            t = torch.randint(0, timesteps, (x0.shape[0],), generator=generator).to(device)
        drop = (torch.rand(x0.shape[0], generator=generator) < config.label_dropout).to(device)
        y[drop] = NULL_CLASS
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step)
        if config.objective == "flow":
            tb = t_flow.float().view(-1, 1, 1, 1)
            x_t = (1.0 - tb) * x0 + tb * noise
            prediction = model(x_t, t_flow.float() * flow_timesteps, class_labels=y).sample
            target = noise - x0
        else:
            x_t = alpha[t].view(-1, 1, 1, 1) * x0 + sigma_vp[t].view(-1, 1, 1, 1) * noise
            prediction = model(x_t, t, class_labels=y).sample
            target = noise
        loss = torch.nn.functional.mse_loss(prediction, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - _ema_decay(config, step))
        losses.append(loss.item())
        progress.update(1)
        if len(losses) == 50:
            progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            losses.clear()
        done = step + 1
        if done % args.checkpoint_every == 0 or done == config.steps:
            elapsed = wall + time.perf_counter() - began
            save_state(state_path, model, ema, optimizer, done, elapsed, config)
        if done % args.export_every == 0 or done == config.steps:
            elapsed = wall + time.perf_counter() - began
            info = _training_info(args, config, done, elapsed, device, ema)
            export(args.out, ema, info)
    progress.close()
    return args.out


def _training_info(
    args: argparse.Namespace,
    config: TrainConfig,
    step: int,
    wall_seconds: float,
    device: torch.device,
    ema: UNet2DModel,
) -> dict[str, Any]:
    meta = provenance.collect({k: v for k, v in vars(args).items() if k != "handler"})
    return {
        "model": MODEL_NAMES[config.objective],
        "step": step,
        "epochs": round(step * config.batch_size / 60_000, 2),
        "wall_seconds": round(wall_seconds, 1),
        "device": str(device),
        "parameters": count_parameters(ema),
        "config": config.as_dict(),
        "data": {"split": args.split, "root": str(args.data or data.default_root(args.split))},
        "provenance": meta,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m models.mnist.train_diffusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="the MNIST split to train on: train (the shipped model); test only for smoke runs",
    )
    p.add_argument(
        "--data", type=Path, default=None, help=f"folder of the MNIST IDX files (default {data.SHARED_ROOT})"
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="epsilon",
        help="epsilon (DDPM, the `mnist` model) or flow (rectified flow, velocity prediction: `mnist-flow`)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="where the exported model goes (default models/builtin/<name>)"
    )
    p.add_argument("--work", type=Path, default=None, help="where the training state goes (default .train/<name>)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--export-every", type=int, default=1000)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--init-from", type=Path, default=None, help="an exported model to start from")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.out = args.out or default_out(args.objective)
    args.work = args.work or default_work(args.objective)
    for name in ("steps", "batch_size", "warmup_steps", "checkpoint_every", "export_every"):
        if getattr(args, name) < 1:
            parser().error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not 0.0 <= args.label_dropout < 1.0 or not 0.0 < args.ema_decay < 1.0 or not math.isfinite(args.lr):
        parser().error("--label-dropout must be in [0, 1), --ema-decay in (0, 1), --lr finite")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        out = train(args)
    except data.MnistDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
