"""`python -m bench accuracy` end to end on a small mixture: files written, orders as declared."""

from __future__ import annotations

import csv
import json

import pytest

from bench.__main__ import main
from bench.sweep import COLUMNS


def test_accuracy_command_writes_tables(tmp_path, capsys):
    assert main(["accuracy", "--out", str(tmp_path), "--dim", "4", "--batch", "8"]) == 0
    printed = capsys.readouterr().out
    assert "dpmpp_3m" in printed
    with open(tmp_path / "accuracy-gmm.csv") as handle:
        rows = list(csv.DictReader(handle))
    heun_odd = [r for r in rows if r["solver"] == "heun" and r["variant"] == "heun" and r["nfe"] == "5"]
    assert heun_odd
    assert heun_odd[0]["reachable"] == "false"
    assert heun_odd[0]["rmse"] == ""
    reachable = [r for r in rows if r["reachable"] == "true"]
    assert all(float(r["rmse"]) > 0 for r in reachable)
    with open(tmp_path / "accuracy-gmm-order.csv") as handle:
        orders = {r["variant"]: r for r in csv.DictReader(handle)}
    for name in ("euler", "heun", "dpmpp_3m", "unipc", "deis"):
        row = orders[name]
        assert float(row["order_exact_start"]) == pytest.approx(float(row["declared_order"]), abs=0.3)
    with open(tmp_path / "accuracy-gmm-schema.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS  # the sweep's shared schema
        shared = list(reader)
    assert [(r["solver"], r["nfe"], r["rmse_ref"]) for r in shared] == [
        (r["variant"], r["nfe"], r["rmse"]) for r in rows
    ]
    assert {r["tier"] for r in shared} == {"analytic"}
    meta = json.loads((tmp_path / "accuracy-gmm.json").read_text())["meta"]
    assert "git" in json.dumps(meta)
    assert "torch" in json.dumps(meta)


def test_bad_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["accuracy", "--dim", "0"])
    assert err.value.code == 2
    assert "--dim" in capsys.readouterr().err


def test_batch_invariance_in_float64(tmp_path):
    """A seed sampled alone and inside a batch is the same image up to float64 rounding."""
    args = ["batch-invariance", "--dtypes", "float64", "--seeds", "4", "--batch", "2", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "batch-invariance.json").read_text())["rows"]
    assert row["seeds"] == 4
    assert row["max_abs_diff"] < 1e-9
    assert row["share_pixels_over_one_level"] == 0.0
