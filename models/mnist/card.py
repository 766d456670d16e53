"""Model cards of the embedded models: README.md beside the weights, rendered from the JSON records
the training script (training.json) and the quality measurement (quality.json, written by
`python -m bench model-card`) leave in the model folder. Re-rendering never loses a number: the
card is a view of those files, which are committed with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.mnist.architecture import FLOW_SCHEDULER_CONFIG, SCHEDULER_CONFIG, UNET_CONFIG


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _provenance_lines(meta: dict[str, Any]) -> list[str]:
    git = meta.get("git") or {}
    device = meta.get("device") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items())
    cuda = ", ".join(device.get("cuda_devices") or []) or "none"
    return [
        f"- command: `{meta.get('command')}`",
        f"- git revision: `{git.get('revision')}`{' (dirty tree)' if git.get('dirty') else ''}",
        f"- host: {device.get('cpu')} ({device.get('cpu_affinity')} cores usable), CUDA devices: {cuda}",
        f"- versions: {versions}",
        f"- finished: {meta.get('timestamp_utc')}",
    ]


def _stopped_lines(training: dict[str, Any]) -> list[str]:
    """A run ended before its planned steps: the card says where and why (training.json `stopped`,
    written by hand when a run is given up; an export of a resumed run drops it)."""
    stopped = training.get("stopped")
    if not stopped:
        return []
    planned = (training.get("config") or {}).get("steps")
    of = f" of the planned {planned:,}" if isinstance(planned, int) else ""
    return [f"- stopped at step {training.get('step')}{of}: {stopped['reason']}"]


def write_diffusion_card(folder: Path) -> Path:
    """(Re)write folder/README.md from folder/training.json and, if present, folder/quality.json."""
    training = _read(folder / "training.json") or {}
    quality = _read(folder / "quality.json")
    config = training.get("config", {})
    unet = UNET_CONFIG
    flow = config.get("objective", "epsilon") == "flow"
    name = training.get("model", "mnist")
    if flow:
        objective = (
            "- objective: rectified flow, x_t = (1 - t) x0 + t eps with t ~ U(0, 1); the UNet predicts the "
            f"velocity v = eps - x0 and takes t * {FLOW_SCHEDULER_CONFIG['num_train_timesteps']} as its timestep "
            f"(scheduler/: FlowMatchEulerDiscreteScheduler, shift {FLOW_SCHEDULER_CONFIG['shift']}); sampled "
            "through the EDM sigma ODE with sigma = t / (1 - t) (models/flow.py)"
        )
        kind = "rectified-flow"
    else:
        objective = (
            f"- objective: epsilon prediction, DDPM {SCHEDULER_CONFIG['beta_schedule']} betas "
            f"{SCHEDULER_CONFIG['beta_start']}..{SCHEDULER_CONFIG['beta_end']}, "
            f"{SCHEDULER_CONFIG['num_train_timesteps']} steps (sigma 0.01..157 in the EDM parameterisation)"
        )
        kind = "diffusion"
    init = ((training.get("provenance") or {}).get("options") or {}).get("init_from")
    lines = [
        f"# `{name}`: the embedded class-conditional MNIST {kind} model",
        "",
        "A diffusers `UNet2DModel` trained by this project's own script "
        f"(`python -m models.mnist.train_diffusion{' --objective flow' if flow else ''}`) on the 60,000 MNIST "
        f'training images. Loaded with `models.load("{name}")`. This model is frozen once benchmarks or AMED '
        "predictors use it: a retrained model ships under a new name.",
        "",
        "## Model",
        f"- architecture: UNet2DModel, {training.get('parameters', '?'):,} parameters"
        if isinstance(training.get("parameters"), int)
        else "- architecture: UNet2DModel",
        f"  - blocks {list(unet['block_out_channels'])} channels at 28x28, 14x14, 7x7; "
        f"{unet['layers_per_block']} ResNet layer per block; GroupNorm({unet['norm_num_groups']}); "
        "self-attention only in the 7x7 middle block",
        f"  - class embedding: {unet['num_class_embeds']} entries (digits 0-9, and 10 = the null class "
        "of classifier-free guidance)",
        objective,
        f"- data: the MNIST {(training.get('data') or {}).get('split', 'train')} split, pixels scaled to [-1, 1], "
        "no augmentation",
        "- weights: the exponential moving average (EMA) of the trained weights, float32 safetensors",
        "",
        "## Training",
        f"- steps: {training.get('step')} at batch {config.get('batch_size')} "
        f"({training.get('epochs')} epochs); AdamW lr {config.get('lr')} after {config.get('warmup_steps')} "
        f"warm-up steps, gradient clip {config.get('grad_clip')}",
        f"- EMA decay {config.get('ema_decay')}; label dropout {config.get('label_dropout')}; "
        f"seed {config.get('seed')}",
        *(
            [
                f"- initialised from the exported weights in `{init}` (the `mnist` epsilon model: its "
                "weights only; optimizer, warm-up, EMA and step count start afresh)"
            ]
            if init and flow
            else []
        ),
        f"- wall time: {training.get('wall_seconds')} s on {training.get('device')}",
        *_stopped_lines(training),
        *_provenance_lines(training.get("provenance") or {}),
        "",
        "## Measured quality",
    ]
    if quality is None:
        lines.append("Not measured yet: run `python -m bench model-card`.")
    else:
        lines += _quality_lines(quality)
    lines.append("")
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _quality_lines(quality: dict[str, Any]) -> list[str]:
    lines = [
        f"Measured by `{quality['meta'].get('command')}` at git revision "
        f"`{(quality['meta'].get('git') or {}).get('revision')}`, with the project's MNIST classifier "
        "(models/builtin/mnist-classifier).",
        "",
        "The bars of the embedded model: guided samples classified as the requested digit >= 97%; "
        "unguided (null-class) samples cover all ten digits, none above 15%. The Frechet distance "
        "(classifier features, squared, as FID reports it) is to the 10,000 MNIST test images; the "
        "noise floor is N real test images against the other 10,000 - N.",
        "",
        "| set | N | sampler | guidance | metric | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in quality["rows"]:
        guidance = "–" if row["guidance"] is None else row["guidance"]
        lines.append(
            f"| {row['set']} | {row['n']} | {row['sampler'] or '–'} | {guidance} | {row['metric']} | {row['result']} |"
        )
    return lines


def write_classifier_card(folder: Path) -> Path:
    """(Re)write folder/README.md of the feature classifier from folder/training.json."""
    training = _read(folder / "training.json") or {}
    lines = [
        "# `mnist-classifier`: the feature network of the in-domain benchmarks",
        "",
        "A small CNN (`models.mnist.architecture.MnistClassifier`: three conv stages 28 -> 14 -> 7 -> 3, "
        "a 128-d penultimate feature) trained by `python -m models.mnist.train_classifier` on the 60,000 "
        "MNIST training images. Its logits score class accuracy of generated digits and its 128-d feature "
        "is the embedding of the in-domain Frechet distance.",
        "",
        f"- parameters: {training.get('parameters')}",
        f"- epochs: {training.get('epochs')} at batch {training.get('batch_size')}; "
        f"augmentation: {training.get('augmentation')}",
        f"- test accuracy (10,000 MNIST test images): {training.get('test_accuracy')}",
        f"- wall time: {training.get('wall_seconds')} s on {training.get('device')}",
        *_stopped_lines(training),
        *_provenance_lines(training.get("provenance") or {}),
        "",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
