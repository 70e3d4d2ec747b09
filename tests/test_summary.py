"""`vaelab info` as a library function: run_summary's text says what the run directory holds, line by line."""

from __future__ import annotations

import json

import pytest

import vaelab
from vaelab.analysis.summary import network_lines, run_summary
from vaelab.cli import main
from vaelab.errors import NotNormalizedWarning, RunError
from vaelab.models.vae import VAE
from vaelab.runs import CONFIG, METRICS, load_run


def _train(tmp_path, data, name, **settings):
    out = tmp_path / name
    vaelab.train(vaelab.TrainConfig(dataset=str(data), latent_dim=2, epochs=1, out=str(out), **settings),
                 progress=False)
    return out


def _sections(text: str) -> tuple[list[str], dict, dict[str, dict]]:
    """(the lines before `config:`, the config's settings, the `last SPLIT:` rows parsed back)."""
    lines = text.splitlines()
    head = lines[:lines.index("config:")]
    config = {}
    for line in lines[lines.index("config:") + 1:]:
        if not line.startswith("  "):
            break
        key, _, value = line.strip().partition(": ")
        config[key] = json.loads(value)
    last = {}
    for line in lines:
        if line.startswith("last "):
            split, _, pairs = line[5:].partition(": ")
            last[split] = dict(pair.split("=", 1) for pair in pairs.split())
    return head, config, last


def _flat(config: dict) -> dict:
    """Settings by name, whether the config is written flat or in sections (data, model, optim, runtime)."""
    if config and all(isinstance(v, dict) for v in config.values()):
        return {k: v for section in config.values() for k, v in section.items()}
    return config


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shown(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


@pytest.mark.parametrize("settings", [dict(hidden=[8]),
                                      dict(arch="conv", hidden=[4], blocks=2, likelihood="discretized-logistic",
                                           sigma="learned-pixel", mixtures=2)], ids=["mlp", "conv-mixture"])
def test_summary_names_the_networks_the_config_and_the_last_metrics(tmp_path, tiny_npz, settings):
    out = _train(tmp_path, tiny_npz, "run", **settings)
    run = load_run(out)
    text = run_summary(out)
    head, config, last = _sections(text)
    arch, hidden = settings.get("arch", "mlp"), settings["hidden"]
    assert head[0] == f"run: {out}"
    assert head[1] == f"model: {arch} {hidden} -> z2, {run.model.likelihood.describe()}"
    assert head[2].startswith(f"  encoder: {_count(run.model.encoder):,} parameters (")
    assert head[3].startswith(f"  decoder: {_count(run.model.decoder):,} parameters (mirrored, "
                              f"{run.model.likelihood.n_params} output tensor(s) per pixel)")
    if arch == "conv":  # tiny_npz is 3x12x10: two stride-2 stages take it to 3x3
        assert head[2].endswith("(2 stride-2 stages, channels 4,8, 2 residual block(s) each, 12x10 -> 3x3)")
        assert head[4:] == [f"  likelihood: {_count(run.model.likelihood):,} parameter(s)"]
        assert _count(run.model.likelihood) > 0
    else:
        assert head[2].endswith("(hidden widths 8)")
        assert head[4:] == []
    saved = json.loads((out / CONFIG).read_text())
    assert _flat(config) == _flat(saved)  # every setting, as config.json holds it
    assert _flat(saved)["hidden"] == hidden
    rows = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    for split in ("train", "test"):
        row = [r for r in rows if r["split"] == split][-1]
        assert last[split] == {k: _shown(v) for k, v in row.items() if k not in ("split", "kl_per_dim")}
    # then the test loss in the words of training's epoch lines and `vaelab eval`: −ELBO, nats/image, bits/dim
    assert (f"loss is the −ELBO in nats per image, lower is better: test −ELBO {row['loss']:.2f} nats/image = "
            f"{row['bits_per_dim']:.3f} bits/dim (rec {row['rec']:.2f}, KL {row['kl']:.2f})") in text.splitlines()
    assert "no metrics yet" not in text
    assert "cross-entropy" not in text


@pytest.mark.parametrize(("shape", "version", "widths"), [
    ((3, 64, 64), 3, "width 64 at ≤16 px, 32 at 32x32, 16 at 64x64"),  # halved per doubling above 16 px
    ((1, 28, 28), 3, "width 64 at ≤16 px, 32 at 28x28"),
    ((3, 64, 64), 2, "width 64"),  # a run saved with net_version 2: the full width at every size
    ((1, 12, 12), 3, "width 64"),  # nothing above 16 px
])
def test_a_hierarchical_summary_gives_the_width_at_each_size(shape, version, widths):
    model = VAE.from_config(vaelab.TrainConfig(arch="hierarchical", hidden=[64], net_version=version), shape)
    encoder = [line for line in network_lines(model, "hierarchical", [64], 1) if line.startswith("encoder")]
    assert encoder == [f"encoder (bottom-up): {_count(model.encoder):,} parameters ({widths}, 1 bottleneck "
                       "block(s) per stride-2 stage)"]


def test_summary_says_when_the_loss_is_not_a_likelihood_and_when_there_are_no_metrics(tmp_path, tiny_npz):
    with pytest.warns(NotNormalizedWarning):
        out = _train(tmp_path, tiny_npz, "grey", hidden=[8], likelihood="bernoulli")
    text = run_summary(out)
    lines = text.splitlines()
    for split in ("train", "test"):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"last {split}: "))
        assert lines[i + 1] == ("  (Bernoulli on non-binary pixels: loss is a cross-entropy, not a normalized "
                                "negative log-likelihood)")
    (out / METRICS).write_text("")
    text = run_summary(out)
    assert text.splitlines()[-1] == "no metrics yet"
    assert "last " not in text


def test_info_is_run_summary_and_the_cli_prints_it(tmp_path, tiny_npz, capsys):
    out = _train(tmp_path, tiny_npz, "run", hidden=[8])
    assert vaelab.info(out) == run_summary(out)
    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out == run_summary(out) + "\n"
    with pytest.raises(RunError, match="not a vaelab run directory"):
        vaelab.info(tmp_path / "nothing")
