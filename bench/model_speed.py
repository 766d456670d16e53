"""`model-speed`: summarise the pytest-benchmark report of bench/speed/test_unet_throughput.py and
test_end_to_end.py (`make bench-unet`) into the model's speed figures and the ratios the goals
are stated in, all from medians of one run:

- img-evals/s of the UNet at batch 256, conditional and guided;
- end-to-end sampling time / (NFE x one forward) at the same batch (goal <= 1.05);
- ours (dpmpp_2m) / the diffusers DPMSolverMultistepScheduler loop, same model, batch and NFE
  (goal <= 1.02 on CPU, <= 0.9 on a GPU): the median ratio of paired rounds (both run back to
  back in each round), and for information the ratio of the separate groups' medians.

Writes bench/results/model-speed.csv and .json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import provenance

from .arguments import options_of
from .errors import BenchError
from .solver_overhead import load_report

NAME = "model-speed"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("measure", "nfe", "batch", "value", "unit", "goal", "device", "torch_threads")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="summarise the model speed benchmarks (make bench-unet) into ratios",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--raw", type=Path, default=RESULTS / "model-speed-raw.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


def summarise(report: dict[str, Any]) -> list[dict[str, Any]]:
    medians: dict[tuple[str, int], float] = {}
    info_of: dict[tuple[str, int], dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        median = bench["stats"]["median"]
        if "images" in info:  # the throughput benchmark
            rows.append(
                {
                    "measure": f"unet_img_evals_per_s_{'guided' if info['evals_per_call'] == 2 else 'conditional'}",
                    "nfe": None,
                    "batch": info["images"],
                    "value": info["images"] * info["evals_per_call"] / median,
                    "unit": "img-evals/s",
                    "goal": ">= 200 on CPU",
                    "device": info.get("device"),
                    "torch_threads": info.get("torch_threads"),
                }
            )
        elif info.get("kind") == "paired":
            rows.append(
                {
                    "measure": "ours_over_diffusers_loop",
                    "nfe": info["nfe"],
                    "batch": info["batch"],
                    "value": info["ratio_median"],
                    "unit": f"ratio (median of {info['rounds']} paired rounds)",
                    "goal": "<= 1.02 CPU, <= 0.9 GPU",
                    "device": info["device"],
                    "torch_threads": info["torch_threads"],
                }
            )
        elif "kind" in info:
            medians[(info["kind"], info["nfe"])] = median
            info_of[(info["kind"], info["nfe"])] = info
    forward = medians.get(("forward", 1))
    if forward is None:
        raise BenchError("the report has no forward benchmark: run make bench-unet (test_end_to_end.py)")
    for (kind, nfe), median in sorted(medians.items()):
        if kind != "ours":
            continue
        info = info_of[(kind, nfe)]
        common = {"nfe": nfe, "batch": info["batch"], "device": info["device"], "torch_threads": info["torch_threads"]}
        rows.append(
            {
                "measure": "sampling_over_nfe_forwards",
                "value": median / (nfe * forward),
                "unit": "ratio",
                "goal": "<= 1.05",
                **common,
            }
        )
        diffusers = medians.get(("diffusers", nfe))
        if diffusers is not None:
            rows.append(
                {
                    "measure": "ours_over_diffusers_loop_unpaired",
                    "value": median / diffusers,
                    "unit": "ratio (medians of separate groups)",
                    "goal": "",
                    **common,
                }
            )
        rows.append({"measure": "sampling_seconds", "value": median, "unit": "s", "goal": "", **common})
    return rows


def run(args: argparse.Namespace) -> int:
    report = load_report(args.raw)
    rows = summarise(report)
    meta = {
        "measurement": report.get("provenance"),
        "source": str(args.raw),
        "summary": provenance.collect(options_of(args)),
    }
    provenance.write_csv(args.out / "model-speed.csv", rows, COLUMNS)
    provenance.write_json(args.out / "model-speed.json", meta, rows)
    for row in rows:
        nfe = f" NFE {row['nfe']}" if row["nfe"] else ""
        print(f"{row['measure']}{nfe} (batch {row['batch']}): {row['value']:.4g} {row['unit']}  goal {row['goal']}")
    return 0
