"""The CLI as a user runs it: real processes, real data, real files."""

import json
import subprocess
import sys

import numpy as np
import pytest

from vaelab.cli import build_parser, main


def vaelab(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "vaelab.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_train_then_info_end_to_end(tmp_path, fashion_dir):
    out = tmp_path / "run"
    r = vaelab("train", "--dataset", "fashion-mnist", "--limit", "3000", "--latent-dim", "2", "--hidden", "128,64",
               "--epochs", "2", "--sigma", "learned", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "epoch 2/2" in r.stderr
    assert "test loss" in r.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    info = vaelab("info", str(out))
    assert info.returncode == 0
    assert 'hidden: [128, 64]' in info.stdout
    assert "last test:" in info.stdout
    assert f"loss={rows[-1]['loss']:.4f}" in info.stdout


@pytest.mark.slow
def test_user_arrays_of_any_shape(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", x=rng.integers(0, 256, size=(300, 20, 14, 3), dtype=np.uint8))
    out = tmp_path / "rgb-run"
    r = vaelab("train", "--dataset", str(tmp_path / "rgb.npz"), "--arch", "conv", "--epochs", "1",
               "--likelihood", "continuous-bernoulli", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model"]["data_shape"] == [3, 20, 14]


@pytest.mark.slow
def test_bernoulli_fashion_mnist_beats_the_pytorch_example(tmp_path, fashion_dir):
    """The issue's check: 784-400-20 MLP, Bernoulli, batch 128, 3 epochs -> test loss <= 250.3 nats."""
    out = tmp_path / "bern"
    r = vaelab("train", "--dataset", "fashion-mnist", "--likelihood", "bernoulli", "--hidden", "400",
               "--latent-dim", "20", "--batch-size", "128", "--epochs", "3", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "not a normalized density" in r.stderr  # grey pixels: vaelab says so
    test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert test["split"] == "test"
    assert test["epoch"] == 3
    assert test["loss"] <= 250.3


BAD = [  # (arguments, words the one error line must contain)
    (["train", "--sigma", "-1"], "--sigma must be a number > 0"),
    (["train", "--sigma", "big"], "learned, learned-pixel, optimal"),
    (["train", "--likelihood", "poisson"], "argument --likelihood: invalid choice: 'poisson'"),
    (["train", "--arch", "cnn"], "argument --arch: invalid choice: 'cnn'"),
    (["train", "--latent-dim", "0"], "--latent-dim must be an integer > 0"),
    (["train", "--hidden", "400,abc"], "--hidden must be comma-separated positive integers"),
    (["train", "--hidden", "0"], "--hidden must be"),
    (["train", "--lr", "0"], "--lr must be a finite number > 0"),
    (["train", "--batch-size", "-5"], "--batch-size must be an integer > 0"),
    (["train", "--dataset", "cifar-99"], "neither a named dataset (mnist, fashion-mnist, cifar10"),
    (["train", "--dataset", "{tmp}/notes.txt"], "unsupported file type '.txt'"),
    (["train", "--dataset", "{tmp}/nan.npy"], "NaN"),
    (["train", "--resume", "{tmp}/nothing-here"], "no checkpoint.safetensors to resume from"),
    (["train", "--resume", "{tmp}", "--sigma", "0.5"], "only --epochs and --device may be given"),
    (["info", "{tmp}/nothing-here"], "not a vaelab run directory"),
    (["train", "--device", "cuda", "--limit", "10"], "--device cuda was requested but"),
    (["train", "--threads", "0", "--limit", "10"], "--threads must be an integer >= 1; got 0"),
    (["eval", "{tmp}", "--threads", "-2"], "--threads must be an integer >= 1; got -2"),
    (["train", "--resume", "{tmp}", "--precision", "bf16"], "only --epochs and --device may be given"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_gets_one_clear_line(tmp_path, capsys, args, needle):
    (tmp_path / "notes.txt").write_text("hello")
    np.save(tmp_path / "nan.npy", np.full((4, 3, 3), np.nan, np.float32))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "cuda" in args:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    if args[0] == "train" and "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    code = main(args)  # in-process: the same entry point as the `vaelab` script, without a process per case
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("vaelab: error: "), lines[0]
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_argparse_errors_are_one_line_with_the_allowed_values(capsys):
    assert main(["train", "--arch", "rnn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # no usage block, no traceback
    assert "--arch: invalid choice: 'rnn'" in err
    assert "mlp" in err
    assert "conv" in err
    assert "vaelab train --help" in err


def test_every_command_has_help_for_every_flag(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"train", "info", "demo"} <= set(sub.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"vaelab {name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--kl-warmup EPOCHS" in out
    assert "learned-pixel" in out
    text = " ".join(out.split())
    assert "total epochs; with --resume, the new total (default 10)" in text  # defaults come from TrainConfig
    assert "(default 128 for mlp, 64 for conv)" in text  # per-family defaults are spelled out


@pytest.mark.slow
def test_out_that_is_a_file_and_resume_that_goes_backwards(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    r = vaelab("train", "--limit", "200", "--epochs", "1", "--out", str(tmp_path / "taken"), "--quiet")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "taken" in r.stderr
    assert (tmp_path / "taken").read_text() == "not a folder"
    run = tmp_path / "short"
    assert vaelab("train", "--limit", "200", "--hidden", "16", "--epochs", "2", "--out", str(run),
                  "--quiet").returncode == 0
    r = vaelab("train", "--resume", str(run), "--epochs", "1")
    assert r.returncode == 2
    assert "must exceed the 2 epochs already trained; got 1" in r.stderr
