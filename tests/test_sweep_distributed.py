"""vaelab sweep under torchrun: the split of the work among the ranks, and a real two-process sweep on Fashion-MNIST
whose page holds the numbers a single process gives for the same runs."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import vaelab
from test_distributed import LAUNCH_TIMEOUT, env, free_port
from vaelab.analysis.sweep import SweepConfig, assign, work_units


@pytest.mark.parametrize(("costs", "size", "ranks"), [
    ([2, 2, 2, 2], 2, [0, 1, 0, 1]),  # equal costs: dealt out in turn
    ([2, 2, 2, 2, 2], 3, [0, 1, 2, 0, 1]),
    ([1, 5, 1, 1, 1, 1], 2, [1, 0, 1, 1, 1, 1]),  # the costliest first, then the least loaded rank: 5 and 5
    ([3, 1], 4, [0, 1]),  # more ranks than units: some have none
    ([4, 4, 4], 1, [0, 0, 0]),
    ([], 2, []),
])
def test_the_split_is_the_same_everywhere_and_gives_each_unit_to_one_rank(costs, size, ranks):
    assert assign(costs, size) == ranks
    assert assign(list(costs), size) == assign(costs, size)  # a pure function: every rank computes the same
    assert all(0 <= r < size for r in ranks)
    loads = [sum(c for c, r in zip(costs, ranks, strict=True) if r == k) for k in range(size)]
    assert max(loads, default=0) - min(loads, default=0) <= max(costs, default=0)


def test_a_batched_ensemble_is_one_unit_of_work(tmp_path):
    points = SweepConfig({"sigma": ["0.1", "0.3", "learned", "1"]}, out=str(tmp_path), hidden="16").points()
    assert work_units(points, batched=False) == [[0], [1], [2], [3]]
    # the fixed σ share a step; a learned σ trains alone: it goes to one rank as one unit, the ensemble to another
    assert work_units(points, batched=True) == [[0, 1, 3], [2]]
    (tmp_path / "sigma=0.3").mkdir()
    (tmp_path / "sigma=0.3" / "config.json").write_text("{}")  # started already: resumed alone, not batched
    assert work_units(points, batched=True) == [[0, 3], [1], [2]]


# four σ and one run that fails (a non-finite loss at lr 1e4, σ 1e-4), given to rank 1 by the split
SIGMAS, LRS = "0.05,0.0001,0.1,0.3,1", "0.001,10000,0.001,0.001,0.001"
SETTINGS = {"dataset": "fashion-mnist", "limit": 512, "epochs": 1, "hidden": "32", "batch_size": 16,
            "latent_dim": 4, "iw_samples": 2, "eval_limit": 300}


def _rows(out) -> list[dict]:
    return list(csv.DictReader((out / "table.csv").read_text().splitlines()))


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-8)
    except ValueError:
        return a == b


@pytest.mark.slow
def test_a_torchrun_sweep_splits_the_runs_and_gives_the_numbers_of_one_process(tmp_path, fashion_dir):
    two, one = tmp_path / "two", tmp_path / "one"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", "-m", "vaelab", "sweep",
           "--set", f"sigma={SIGMAS}", "--set", f"lr={LRS}", "--zip", *flags, "--out", str(two)]
    launched = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:  # the same sweep in this process, meanwhile
        vaelab.sweep({"sigma": SIGMAS.split(","), "lr": LRS.split(",")}, zip=True, out=str(one), progress=False,
                     **SETTINGS)
        stdout, stderr = launched.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        launched.kill()
    assert launched.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # rank 0 alone writes the page
    record = json.loads((two / "sweep.json").read_text())["runs"]
    labels = [r["run"] for r in record]
    assert labels == [r["run"] for r in _rows(one)]
    assert len(labels) == 5
    # each run was started by exactly one rank, the one sweep.json names, and trained as a run of one process
    started = re.findall(r"vaelab sweep \(rank (\d) of 2\): \[\d/5\] (\S+)", stderr)
    assert sorted(label for _, label in started) == sorted(labels)
    assert {label: int(rank) for rank, label in started} == {r["run"]: r["rank"] for r in record}
    assert [r["rank"] for r in record] == [0, 1, 0, 1, 0]
    assert [r["action"] for r in record] == ["trained", "failed", "trained", "trained", "trained"]
    assert "non-finite" in record[1]["error"]
    # every rank evaluated its runs on the first 300 test images, as one process does
    assert [r["eval"]["numbers"]["n_images"] for r in record if r["eval"]] == [300] * 4
    for label in labels[:1] + labels[2:]:
        lines = [json.loads(x) for x in (two / label / "metrics.jsonl").read_text().splitlines()]
        assert {x["world_size"] for x in lines} == {1}
        a, b = load_file(two / label / "model.safetensors"), load_file(one / label / "model.safetensors")
        assert all((a[k] - b[k]).abs().max() <= 1e-5 * b[k].abs().max() for k in b), label
    # the page: the same rows and numbers as one process gives, the failed run listed without numbers
    rows, reference = _rows(two), _rows(one)
    assert rows[1]["loss"] == reference[1]["loss"] == ""
    for r, ref in zip(rows, reference, strict=True):
        assert r.keys() == ref.keys()
        assert all(_same_number(r[k], ref[k]) for k in ref), (r, ref)
    assert float(rows[0]["loss"]) > float(rows[2]["loss"]) > float(rows[3]["loss"])  # smaller σ, more nats
    assert (two / "index.html").read_text().count("data:image/png;base64,") == \
        (one / "index.html").read_text().count("data:image/png;base64,")


@pytest.mark.slow
def test_a_torchrun_sigma_study_splits_the_settings_and_gives_the_numbers_of_one_process(tmp_path, fashion_dir):
    two, one = tmp_path / "two", tmp_path / "one"
    flags = ["--dataset", "fashion-mnist", "--limit", "512", "--epochs", "1", "--hidden", "32", "--batch-size", "16",
             "--iw-samples", "2", "--sigmas", "0.1,1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", "0", "-m", "vaelab", "sigma-study",
           *flags, "--out", str(two)]
    launched = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:  # the same study in this process, meanwhile
        alone = subprocess.run([sys.executable, "-m", "vaelab", "sigma-study", *flags, "--out", str(one), "--quiet"],
                               capture_output=True, text=True, env=env(), timeout=LAUNCH_TIMEOUT)
        stdout, stderr = launched.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        launched.kill()
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert launched.returncode == 0, stderr[-3000:]
    assert stdout.count("wrote ") == 1  # rank 0 alone writes the study
    # each setting was trained by one rank, as a run of one process
    started = re.findall(r"sigma-study \(rank (\d) of 2\): \[\d/2\] (\S+)", stderr)
    assert sorted(started) == [("0", "0.1"), ("1", "1")]
    for label in ("sigma-0.1", "sigma-1"):
        lines = [json.loads(x) for x in (two / label / "metrics.jsonl").read_text().splitlines()]
        assert {x["world_size"] for x in lines} == {1}
    rows, reference = _rows(two), _rows(one)
    assert [r["setting"] for r in rows] == ["0.1", "1"]
    for r, ref in zip(rows, reference, strict=True):
        assert all(_same_number(r[k], ref[k]) for k in ref), (r, ref)
    assert (two / "index.html").read_text().count("data:image/png;base64,") == \
        (one / "index.html").read_text().count("data:image/png;base64,")
