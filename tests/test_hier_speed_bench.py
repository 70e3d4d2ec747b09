"""benchmarks/hier_speed.py: its --precision list, its plain loop under bf16 autocast, and its result lines."""

import pytest
import torch

from benchmark_scripts import load_benchmark
from vaelab import TrainConfig
from vaelab.models.vae import VAE
from vaelab.training.build import autocast


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("hier_speed")


@pytest.mark.parametrize(("text", "expected"), [("fp32", ["fp32"]), ("bf16", ["bf16"]),
                                                 ("fp32,bf16", ["fp32", "bf16"]), (" bf16 , fp32 ", ["bf16", "fp32"])])
def test_precision_lists_parse_in_order(bench, text, expected):
    assert bench.parse_precisions(text) == expected


@pytest.mark.parametrize("text", ["fp16", "fp32,bf17", "fp32,fp32", ","])
def test_bad_precision_lists_exit_naming_the_value_and_the_choices(bench, text, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse(["--precision", text])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert f"got {text!r}" in err
    assert "fp32, bf16" in err


@pytest.mark.parametrize(("text", "expected"), [("", []), ("2", [2]), ("2/ 3", [2, 3]),
                                                 ("2/1,2,4,1", [2, [1, 2, 4, 1]]), ("1, 1", [[1, 1]])])
def test_group_settings_parse_in_order(bench, text, expected):
    assert bench.parse(["--groups", text]).group_counts == expected


def test_group_kinds_are_named_by_their_counts(bench):
    assert [bench.group_kind(g) for g in (2, [1, 2, 4, 1])] == ["groups2", "groups1-2-4-1"]


@pytest.mark.parametrize("text", ["1", "2/2", "1,2/1,2", "two", "0", "-2", "1,0", "1,,2"])
def test_bad_group_settings_exit_naming_the_value(bench, text, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse([f"--groups={text}"])
    assert e.value.code != 0
    assert f"--groups must list settings, each once, '/'-separated: an integer >= 2 or one count per resolution " \
           f"such as 1,2,4,1; got {text!r}" in capsys.readouterr().err


def test_an_extra_kind_gets_its_lines_and_its_bf16_ratio(bench):
    times = {(kind, prec): [2.0 if prec == "fp32" else 1.0] * 3 for prec in ("fp32", "bf16")
             for kind in (*bench.KINDS, "groups2")}
    times["groups2", "fp32"] = [4.0] * 3
    lines = bench.report(times, ["fp32", "bf16"])
    assert lines[4].split() == ["groups2", "4.000", "ms/image", "(CPU", "time;", "quartiles", "4.000", "..",
                                "4.000),", "2.000x", "plain"]
    assert lines[-1].startswith("groups2 bf16/fp32 0.250x the time per image")


def test_the_result_lines_keep_fp32_names_and_give_bf16_over_fp32(bench):
    times = {(kind, prec): [base * (0.5 if prec == "bf16" else 1.0)] * 3
             for prec in ("fp32", "bf16") for kind, base in zip(bench.KINDS, (4.0, 2.0, 3.0, 1.0), strict=True)}
    times["conv", "fp32"], times["conv", "bf16"] = [1.0, 2.0, 1.0], [0.8, 1.8, 1.0]  # medians 1.0 and 1.0
    lines = bench.report(times, ["fp32", "bf16"])
    assert lines[0].startswith("vaelab ")
    assert lines[0].endswith("2.000x plain")
    assert lines[4].startswith("vaelab bf16 ")
    assert lines[4].endswith("2.000x plain")  # against plain in bf16
    assert lines[7].startswith("conv bf16 ")
    assert lines[7].endswith("1.000x plain")
    same = "0.500x the time per image (per round: median 0.500, quartiles 0.500 .. 0.500)"
    assert lines[8:] == [f"vaelab  bf16/fp32 {same}", f"plain   bf16/fp32 {same}", f"v2      bf16/fp32 {same}",
                         "conv    bf16/fp32 1.000x the time per image (per round: median 0.900, quartiles 0.850 .. "
                         "0.950)"]  # rounds 0.8, 0.9, 1.0: the ratio within each round
    assert len(bench.report({k: v for k, v in times.items() if k[1] == "fp32"}, ["fp32"])) == 4  # no ratio lines


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_the_plain_loop_runs_its_forward_pass_under_the_autocast_it_is_given(bench):
    cfg = TrainConfig(arch="hierarchical", likelihood="discretized-logistic", hidden=[16], precision="bf16")
    model = VAE.from_config(cfg, (1, 8, 8))
    seen: list[torch.dtype] = []
    model.encoder.register_forward_hook(lambda m, i, out: seen.append(next(iter(_tensors(out))).dtype))
    x = torch.rand(4, 1, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss = bench.plain_step(model, optimizer, lambda idx: x[idx], autocast(cfg, torch.device("cpu")))(
        torch.arange(4), 1.0)
    assert torch.isfinite(loss)
    assert loss.dtype == torch.float32
    bench.plain_step(model, optimizer, lambda idx: x[idx])(torch.arange(4), 1.0)
    assert seen == [torch.bfloat16, torch.float32]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        yield from (t for v in out.values() for t in _tensors(v))
    else:
        yield from (t for v in out for t in _tensors(v))
