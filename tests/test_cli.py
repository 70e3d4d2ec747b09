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
    assert "test −ELBO" in r.stdout
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
    (["train", "--resume", "{tmp}", "--sigma", "0.5"], "only --epochs, --device and --time-limit may be given"),
    (["info", "{tmp}/nothing-here"], "not a vaelab run directory"),
    (["train", "--device", "cuda", "--limit", "10"], "--device cuda was requested but"),
    (["train", "--threads", "0", "--limit", "10"], "--threads must be an integer >= 1; got 0"),
    (["eval", "{tmp}", "--threads", "-2"], "--threads must be an integer >= 1; got -2"),
    (["train", "--resume", "{tmp}", "--precision", "bf16"], "only --epochs, --device and --time-limit may be given"),
    (["train", "--latent_dim", "2"], "unrecognized arguments: --latent_dim 2; did you mean --latent-dim? "
     "(see vaelab train --help)"),
    (["train", "--latent_dim=2"], "did you mean --latent-dim?"),
    (["train", "--ephocs", "3"], "did you mean --epochs?"),
    (["trian", "--epochs", "1"], "invalid choice: 'trian'"),
    (["trian", "--epochs", "1"], "did you mean train?"),
    (["sigma_study"], "did you mean sigma-study?"),
    (["explore", "{tmp}", "--no-brwser"], "did you mean --no-browser? (see vaelab explore --help)"),
    (["train", "--likelihood", "continuous_bernoulli"], "did you mean continuous-bernoulli?"),
    (["train", "--arch", "hierarchical", "--groups", "0,2"], "--groups must be a positive integer, or one count per "
     "latent resolution, top first, such as 1,2,4,1 (0 leaves a resolution without latents: 1,2,4,0; the top needs "
     "one); got '0,2'"),
    (["train", "--dataset", "{tmp}/grey.npy", "--arch", "hierarchical", "--groups", "1,2"], "--groups gives 2 "
     "counts, but 12x12 images have 3 latent resolutions (1x1, 3x3, 6x6): give one count, or 3, top first"),
]


@pytest.mark.parametrize(("args", "needle"), BAD, ids=[" ".join(a[:3]) for a, _ in BAD])
def test_bad_input_gets_one_clear_line(tmp_path, capsys, args, needle):
    (tmp_path / "notes.txt").write_text("hello")
    np.save(tmp_path / "nan.npy", np.full((4, 3, 3), np.nan, np.float32))
    np.save(tmp_path / "grey.npy", np.random.default_rng(0).random((20, 12, 12), np.float32))
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
    assert not (tmp_path / "out").exists()


def test_argparse_errors_are_one_line_with_the_allowed_values(capsys):
    assert main(["train", "--arch", "rnn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # no usage block, no traceback
    assert "--arch: invalid choice: 'rnn'" in err
    assert "mlp" in err
    assert "conv" in err
    assert "vaelab train --help" in err


@pytest.mark.parametrize("args", [["train", "--foo", "1"], ["train", "--wandb"], ["explore", "run", "--open"],
                                  ["info", "run", "--no-brwser"], ["train", "--arch", "rnn"], ["--verbose"]])
def test_a_flag_with_no_near_name_gets_no_made_up_suggestion(capsys, args):
    """Suggestions come from the command's own flags and only when one is near: `info` has no --no-browser."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "did you mean" not in err, err


def test_several_misspelt_flags_each_get_their_suggestion(capsys):
    assert main(["train", "--latent_dim", "2", "--batch_size", "8", "--nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "--latent_dim: did you mean --latent-dim?" in err
    assert "--batch_size: did you mean --batch-size?" in err
    assert "--nope:" not in err


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
    assert "(default 128 for mlp, 16 for conv, 32 for hierarchical)" in text  # per-family defaults are spelled out


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


def _flat_images(path, seed=0):
    """Near-constant grey 8x8 images: once a Gaussian decoder fits them to within a few levels, its density exceeds
    1 per pixel and the −log p are below 0."""
    rng = np.random.default_rng(seed)
    x = np.clip(128 + rng.normal(0, 3, size=(200, 1, 8, 8)), 0, 255).astype(np.uint8)
    np.savez(path, x=x)
    return path


def test_negative_log_likelihoods_are_printed_one_way_and_explained_once(tmp_path, capsys):
    from vaelab.training.evaluation import NEGATIVE_NOTE

    data, run = _flat_images(tmp_path / "flat.npz"), tmp_path / "run"
    assert main(["train", "--dataset", str(data), "--latent-dim", "2", "--hidden", "8", "--sigma", "optimal",
                 "--lr", "0.01", "--batch-size", "20", "--epochs", "4", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "test"]
    first = next((i for i, v in enumerate(losses) if v < 0), None)
    assert first is not None, f"the data must end with a density above 1 per pixel: test −ELBO {losses}"
    assert losses[0] > 0, "and start below it, so that the note's place is tested"
    lines = [line.split("\r")[-1] for line in captured.err.splitlines()]  # the progress bar shares the lines
    epoch_lines = [i for i, line in enumerate(lines) if "test −ELBO" in line]
    assert [lines[i].split(":")[0] for i in epoch_lines] == [f"epoch {e}/4" for e in range(1, 5)]
    t = rows[1]
    assert lines[epoch_lines[0]].startswith(f"epoch 1/4: test −ELBO {t['loss']:.2f} nats/image = "
                                            f"{t['bits_per_dim']:.3f} bits/dim (rec {t['rec']:.2f}, KL {t['kl']:.2f}),")
    assert captured.err.count(NEGATIVE_NOTE) == 1
    assert lines[epoch_lines[first] + 1] == f"  ({NEGATIVE_NOTE})"  # right after the first epoch below 0
    assert "test loss" not in captured.err + captured.out
    assert captured.out.startswith(f"{run}: test −ELBO {losses[-1]:.2f} nats/image")
    assert NEGATIVE_NOTE not in captured.out  # the epoch lines said it

    assert main(["train", "--resume", str(run), "--epochs", "5", "--quiet"]) == 0
    assert capsys.readouterr().out.count(NEGATIVE_NOTE) == 1  # no epoch lines: the final line says it

    assert main(["eval", str(run), "--iw-samples", "3", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert table.count(NEGATIVE_NOTE) == 1
    assert "−log p(x) ≤ (IWAE, K = 3)" in table
    assert "\nELBO" not in table
    assert "\nlog p(x)" not in table
    assert main(["info", str(run)]) == 0
    assert capsys.readouterr().out.count(NEGATIVE_NOTE) == 1


def test_positive_log_likelihoods_get_no_explanation(tmp_path, capsys):
    from vaelab.training.evaluation import NEGATIVE_NOTE

    run = tmp_path / "run"  # binarized noise under a Bernoulli: a probability mass, −log p > 0
    assert main(["train", "--dataset", str(_flat_images(tmp_path / "flat.npz")), "--latent-dim", "2", "--hidden",
                 "8", "--likelihood", "bernoulli", "--binarize", "static", "--epochs", "1", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--iw-samples", "2", "--quiet"]) == 0
    assert main(["info", str(run)]) == 0
    captured = capsys.readouterr()
    assert "test −ELBO" in captured.err
    assert "−ELBO (loss, lower is better)" in captured.out
    assert NEGATIVE_NOTE not in captured.err + captured.out


@pytest.mark.slow
def test_a_closed_pipe_ends_quietly(tmp_path, fashion_dir):
    """`vaelab info RUN | head`: when the reader has gone, no traceback and no "Broken pipe" error line; the exit
    status a shell gives a process ended by SIGPIPE."""
    import os

    from vaelab import TrainConfig, train

    train(TrainConfig(dataset="fashion-mnist", limit=128, hidden="16", epochs=1, out=str(tmp_path / "run")),
          progress=False)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before vaelab writes a byte
    proc = subprocess.run([sys.executable, "-m", "vaelab", "info", str(tmp_path / "run")], stdout=w,
                          stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert proc.stderr == ""
    assert proc.returncode == 141
