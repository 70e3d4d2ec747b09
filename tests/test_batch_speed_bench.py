"""benchmarks/batch_speed.py: its --batch-sizes list, and one short timed block on real `shapes` images."""

import json

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("batch_speed")


def test_batch_sizes_parse_in_order(bench):
    assert bench.parse_sizes("16,32,64") == [16, 32, 64]
    assert bench.parse_sizes(" 64, 8 ") == [64, 8]


@pytest.mark.parametrize("text", ["", "16,16", "3", "0", "256", "a,b", "-16"])
def test_bad_batch_sizes_are_refused_with_the_allowed_values(bench, text):
    with pytest.raises(ValueError, match="divisors of 128"):
        bench.parse_sizes(text)


@pytest.mark.slow
def test_one_block_times_every_batch_size(bench, capsys):
    bench.main(["--arch", "mlp", "--dataset", "shapes", "--batch-sizes", "32,64", "--blocks", "1"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["batches"]) == {"32", "64"}
    assert result["batches"]["64"]["vs_batch_64"] == 1.0
    assert all(r["ms_per_image"] > 0 for r in result["batches"].values())
