"""The embedded MNIST models as shipped: the diffusion model end to end, the feature classifier on
the test set, the data reader's checks, the training script's exact resume, and the model-card
command on a small run."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
import solvers
from bench.__main__ import main as bench_main
from bench.mnist_quality import quantise
from models.mnist import data, train_diffusion
from models.mnist.architecture import NULL_CLASS
from models.mnist.classifier import DEFAULT_CLASSIFIER, load_classifier

SHIPPED = Path(models.BUILTINS["mnist"].folder)


@pytest.fixture(scope="module")
def mnist() -> models.DiffusionModel:
    return models.load("mnist", device="cpu")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_classifier()


def test_shipped_files_are_small_safetensors() -> None:
    weights = SHIPPED / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 25 * 2**20
    assert not list(SHIPPED.rglob("*.bin"))
    assert (SHIPPED / "README.md").read_text().count("## Measured quality") == 1
    training = json.loads((SHIPPED / "training.json").read_text())
    assert 300_000 <= training["parameters"] <= 1_000_000


def test_shipped_model_attributes(mnist: models.DiffusionModel) -> None:
    assert mnist.sample_shape == (1, 28, 28)
    assert mnist.null_class == NULL_CLASS
    assert mnist.num_class_embeds == 11
    assert mnist.prediction_type == "epsilon"
    assert mnist.sigma_max == pytest.approx(157.4, rel=1e-3)
    assert mnist.fingerprint == models.load("mnist", device="cpu").fingerprint


def test_shipped_model_draws_the_requested_digits(mnist: models.DiffusionModel, classifier: torch.nn.Module) -> None:
    labels = torch.arange(64) % 10
    noise = solvers.make_noise(list(range(64)), mnist.sample_shape)
    with torch.inference_mode():
        result = solvers.sample(mnist.conditioned(labels, 2.0), noise, solver="dpmpp_2m", steps=20)
        predicted = classifier(quantise(result.images)).argmax(dim=1)
    assert result.nfe == 20
    assert result.network_evals == 40
    accuracy = float((predicted == labels).double().mean())
    assert accuracy >= 0.90, f"only {accuracy:.1%} of 64 guided samples show the requested digit"


def test_shipped_classifier_accuracy(classifier: torch.nn.Module) -> None:
    test = data.load("test")
    with torch.inference_mode():
        predicted = torch.cat([classifier(part).argmax(dim=1) for part in test.scaled().split(2000)])
    accuracy = float((predicted == test.labels).double().mean())
    assert accuracy >= 0.99
    assert classifier.features(test.scaled()[:3]).shape == (3, 128)


def test_classifier_load_errors(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match=r"config.json does not exist"):
        load_classifier(tmp_path)
    shutil.copytree(DEFAULT_CLASSIFIER, tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(models.ModelError, match=r"model.safetensors is not a readable safetensors file"):
        load_classifier(tmp_path / "c")


def test_data_reader_checks_the_files(tmp_path: Path) -> None:
    with pytest.raises(data.MnistDataError, match=r"t10k-images-idx3-ubyte.gz does not exist"):
        data.load("test", tmp_path)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(data.BUNDLED_TEST_ROOT / name, tmp_path / name)
    raw = bytearray(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one wrong label
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.MnistDataError, match=r"t10k-labels-idx1-ubyte.gz is not the published MNIST file: md5"):
        data.load("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(data.MnistDataError, match=r"not a readable gzip file"):
        data.load("test", tmp_path)


@pytest.mark.parametrize("objective", ["epsilon", "flow"])
def test_training_resumes_exactly(tmp_path: Path, objective: str) -> None:
    # The bundled test split keeps this runnable anywhere; the logic is the same for the train split.
    common = [
        "--objective",
        objective,
        "--split",
        "test",
        "--batch-size",
        "8",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--export-every",
        "100",
        "--threads",
        "1",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_diffusion.main([*common, "--steps", "3", "--work", str(straight), "--out", str(straight / "m")]) == 0
    assert train_diffusion.main([*common, "--steps", "1", "--work", str(split), "--out", str(split / "m")]) == 0
    assert train_diffusion.main([*common, "--steps", "3", "--work", str(split), "--out", str(split / "m")]) == 0
    a = load_file(str(straight / train_diffusion.STATE_FILE))
    b = load_file(str(split / train_diffusion.STATE_FILE))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    exported = models.load(split / "m", device="cpu", null_class=NULL_CLASS)
    assert json.loads((split / "m" / "training.json").read_text())["step"] == 3
    assert exported.fingerprint != models.load("mnist", device="cpu").fingerprint
    # The scheduler config tells the loader what the UNet predicts.
    assert exported.prediction_type == ("flow_prediction" if objective == "flow" else "epsilon")
    # A state is resumed only under the objective it was trained with.
    other = "epsilon" if objective == "flow" else "flow"
    with pytest.raises(SystemExit, match=r"other settings .*objective"):
        train_diffusion.main(
            [*common[2:], "--objective", other, "--steps", "4", "--work", str(split), "--out", str(split / "x")]
        )


def test_model_card_command_small_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "model-card",
        "--per-digit",
        "2",
        "--unguided",
        "20",
        "--steps",
        "3",
        "--speed-batch",
        "8",
        "--speed-repeats",
        "1",
        "--device",
        "cpu",
        "--no-card",
        "--out",
        str(tmp_path),
    ]
    assert bench_main(argv) == 0
    with open(tmp_path / "model-card-mnist.csv") as handle:
        rows = {(r["set"], r["metric"]): r for r in csv.DictReader(handle)}
    assert 0.0 <= float(rows["guided", "class_accuracy"]["value"]) <= 1.0
    assert float(rows["guided", "frechet_distance"]["value"]) > 0
    assert float(rows["real test images", "classifier_accuracy"]["value"]) >= 0.99
    assert rows["guided", "class_accuracy"]["n"] == "20"
    assert rows["guided", "class_accuracy"]["guidance"] == "1.0"  # the last of --guidance 2 1 wins the key
    meta = json.loads((tmp_path / "model-card-mnist.json").read_text())["meta"]
    assert meta["fingerprint"] == models.load("mnist", device="cpu").fingerprint
    assert "class_accuracy" in capsys.readouterr().out
