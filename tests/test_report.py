"""The report end to end: the real CLI on a trained Fashion-MNIST run, then report.html opened in a real headless
browser (Chromium), which must load every embedded figure and render a non-blank page; plus eval --json,
plot --only and the one-line errors for bad input."""

import inspect
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

import vaelab
from conftest import vaelab_cmd
from trained_runs import trained_run
from vaelab import load_run
from vaelab.analysis.metrics import DEFAULT_IW_SAMPLES, headline
from vaelab.analysis.reporting import FIGURES
from vaelab.analysis.study import StudyConfig
from vaelab.api import DEMO_IW_SAMPLES
from vaelab.cli import build_parser, main
from vaelab.models.nets import n_parameters

JSON_KEYS = {"elbo", "log_px", "iw_samples", "bits_per_dim", "mse", "kl", "kl_per_dim", "active_units",
             "radius_share", "radius_quantiles", "knn_agreement", "sharpness", "sigma"}
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def run_browser(browser: str, tmp_path, *args) -> subprocess.CompletedProcess:
    cmd = [browser, *BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'browser-profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, fashion_dir):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    res = subprocess.run([*vaelab_cmd(), "report", str(run_dir), "--out", str(out), "--limit", "500",
                          "--iw-samples", "20", "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out, res


def test_report_writes_every_figure_and_a_self_contained_html(report, run_dir):
    out, res = report
    path = out / "report.html"
    assert res.stdout.strip().splitlines()[-1] == str(path)
    assert "(IWAE, K = 20)" in res.stdout.strip().splitlines()[-2]  # the bound, with its K
    for name in FIGURES:
        assert (out / f"{name}.png").is_file(), name
    text = path.read_text()
    assert text.count('src="data:image/png;base64,') == len(FIGURES)
    assert "src=\"http" not in text
    assert "file://" not in text  # nothing outside the file
    numbers = json.loads((out / "eval.json").read_text())
    assert numbers.keys() >= JSON_KEYS
    assert f"{-numbers['elbo']:.2f}" in text
    assert f"−log p(x) ≤ (IWAE, K = 20)</th><td>{-numbers['log_px']:.2f} nats/image" in text
    config = json.loads((run_dir / "config.json").read_text())["model"]
    assert f"<th>likelihood</th><td>&quot;{config['likelihood']}&quot;</td>" in text
    assert not list(out.glob(".*.tmp"))


@pytest.mark.browser
def test_report_opens_in_a_headless_browser_with_every_figure_loaded(report, tmp_path, browser_path):
    out, _ = report
    # The DOM after load, with a probe that records each <img>'s decoded size, run on a copy of the report.
    probe = ('<script>window.addEventListener("load", () => { const p = document.createElement("pre"); '
             'p.id = "probe"; p.textContent = JSON.stringify(Array.from(document.images, '
             'i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width])); '
             'p.dataset.height = document.documentElement.scrollHeight; '
             "document.body.appendChild(p); });</script></body>")
    page = tmp_path / "probe.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe))
    res = run_browser(browser_path, tmp_path, "--virtual-time-budget=10000", "--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="probe" data-height="(\d+)">(.*?)</pre>', res.stdout)
    assert found, res.stdout[-2000:]
    page_height, images = int(found[1]), json.loads(found[2])
    assert len(images) == len(FIGURES)
    for complete, img_w, img_h, shown in images:
        assert complete
        assert img_w > 100
        assert img_h > 100
        assert shown > 100

    shot = out / "report-screenshot.png"  # kept next to the report for a human to look at
    res = run_browser(browser_path, tmp_path, f"--screenshot={shot}", f"--window-size=1200,{page_height}",
                      (out / "report.html").as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.is_file()
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32) / 255
    assert img.shape == (page_height, 1200)
    assert page_height > 3000  # nine figures stacked
    ink = img < 0.5
    assert ink.mean() > 0.02, "the page is (nearly) blank"
    bands = [band.mean() for band in np.array_split(ink, 8)]
    assert min(bands) > 0.002, f"some part of the page shows nothing: ink per eighth of the page {bands}"


def test_eval_prints_a_table_and_writes_the_json(run_dir, tmp_path):
    path = tmp_path / "sub" / "numbers.json"
    res = subprocess.run([*vaelab_cmd(), "eval", str(run_dir), "--limit", "300", "--iw-samples", "5",
                          "--json", str(path), "--quiet"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    numbers = _strict_json(path.read_text())
    assert numbers.keys() >= JSON_KEYS
    assert numbers["iw_samples"] == 5
    assert numbers["n_images"] == 300
    assert numbers["split"] == "test"
    assert set(numbers["radius_share"]) == set(numbers["radius_quantiles"]) == {"68", "95", "99.7"}
    assert numbers["radius_quantiles"]["99.7"] == pytest.approx(3.4086, abs=1e-4)  # 2-D: sqrt(-2 ln 0.003)
    assert set(numbers["sharpness"]) == {"data", "recon",
                                                                                               "samples"}
    assert len(numbers["kl_per_dim"]) == 2
    assert numbers["sigma"] == pytest.approx(0.1)
    assert 0 <= numbers["knn_agreement"] <= 1
    assert f"{-numbers['log_px']:.2f}" in res.stdout
    assert "−log p(x) ≤ (IWAE, K = 5)" in res.stdout
    assert "active units" in res.stdout


def test_eval_report_demo_and_study_share_one_default_k(run_dir, tmp_path, capsys):
    """The same run gives the same log p(x) from `eval` and `report` unless the user asks otherwise."""
    parser = build_parser()
    defaults = {cmd: parser.parse_args([cmd, str(run_dir)]).iw_samples for cmd in ("eval", "report")}
    assert defaults == {"eval": DEFAULT_IW_SAMPLES, "report": DEFAULT_IW_SAMPLES}
    assert parser.parse_args(["sigma-study"]).iw_samples == DEFAULT_IW_SAMPLES
    assert StudyConfig().iw_samples == DEMO_IW_SAMPLES == DEFAULT_IW_SAMPLES
    for fn in (vaelab.evaluate, vaelab.report):
        assert inspect.signature(fn).parameters["iw_samples"].default == DEFAULT_IW_SAMPLES, fn.__name__
    assert main(["eval", str(run_dir), "--limit", "40", "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    assert f"−log p(x) ≤ (IWAE, K = {DEFAULT_IW_SAMPLES})" in capsys.readouterr().out
    assert main(["report", str(run_dir), "--limit", "40", "--out", str(tmp_path / "r"), "--quiet"]) == 0
    said = capsys.readouterr().out
    evaluated, reported = (json.loads(p.read_text()) for p in (tmp_path / "e.json", tmp_path / "r" / "eval.json"))
    assert evaluated["iw_samples"] == reported["iw_samples"] == DEFAULT_IW_SAMPLES
    assert evaluated["log_px"] == pytest.approx(reported["log_px"], rel=1e-12)  # same seed, same K: same number
    assert said.splitlines()[0] == headline(reported).splitlines()[0]
    assert f"(IWAE, K = {DEFAULT_IW_SAMPLES})" in said
    assert f"K = {DEFAULT_IW_SAMPLES}" in (tmp_path / "r" / "report.html").read_text()


def test_unlabelled_non_gaussian_run_reports_nulls(tmp_path, tmp_path_factory, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "plain.npz", x=rng.integers(0, 256, size=(120, 1, 8, 8), dtype=np.uint8))  # no labels
    run = trained_run(tmp_path_factory, dataset=str(tmp_path / "plain.npz"), likelihood="laplace", epochs=1,
                      hidden=[16], limit=None)
    assert main(["eval", str(run), "--iw-samples", "3", "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["knn_agreement"] is None
    assert numbers["sigma"] is None
    assert "n/a (needs labels" in capsys.readouterr().out


def _strict_json(text):
    def reject(name):
        raise AssertionError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=reject)


def test_eval_of_a_single_image_is_valid_json(run_dir, tmp_path):
    assert main(["eval", str(run_dir), "--limit", "1", "--iw-samples", "2", "--json", str(tmp_path / "one.json"),
                 "--quiet"]) == 0
    numbers = _strict_json((tmp_path / "one.json").read_text())
    assert numbers["n_images"] == 1
    assert numbers["knn_agreement"] is None
    assert numbers["log_px_stderr"] is None


def test_plot_only_writes_one_figure(run_dir, tmp_path, capsys):
    assert main(["plot", str(run_dir), "--only", "kl", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "kl.png")
    assert [p.name for p in tmp_path.iterdir()] == ["kl.png"]


@pytest.mark.parametrize(("args", "needle"), [
    (["plot", "{run}", "--only", "nope"], "--only must be one of manifold, scatter, reconstructions"),
    (["plot", "{run}", "--only", "keeping"], "--only keeping shows the latent groups of an --arch hierarchical "
                                             "model; "),
    (["plot", "{run}", "--only", "levels", "--out", "{tmp}/figs"], "has --arch mlp"),
    (["eval", "{run}", "--iw-samples", "0"], "--iw-samples must be an integer >= 1; got 0"),
    (["eval", "{run}", "--split", "valid"], "--split must be one of train, test; got 'valid'"),
    (["eval", "{run}", "--batch-size", "-3"], "--batch-size must be an integer >= 1; got -3"),
    (["eval", "{run}", "--json", "{tmp}"], "--json must be a file name"),
    (["report", "{tmp}"], "not a vaelab run directory"),
    (["eval", "{tmp}/missing"], "not a vaelab run directory"),
])
def test_bad_input_gets_one_line_and_no_files(run_dir, tmp_path, capsys, args, needle):
    before = sorted(p.name for p in run_dir.iterdir())
    argv = [a.format(run=run_dir, tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("vaelab: error: "), err
    assert needle in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"arch": "conv", "hidden": [4], "likelihood": "discretized-logistic", "sigma": "learned-pixel", "mixtures": 2},
    {"arch": "conv", "hidden": [4], "blocks": 2, "likelihood": "discretized-gaussian", "sigma": "learned"},
    {"likelihood": "laplace", "sigma": "learned"},
], ids=["conv-logistic-mixture", "conv-gaussian-8bit", "mlp-laplace-learned"])
def test_every_figure_and_number_for_the_new_networks_and_likelihoods(tmp_path, tmp_path_factory, overrides,
                                                                     fashion_dir):
    run = trained_run(tmp_path_factory, epochs=1, limit=600, latent_dim=3, **overrides)
    assert main(["report", str(run), "--out", str(tmp_path), "--limit", "200", "--iw-samples", "8", "--quiet"]) == 0
    for name in FIGURES:
        assert (tmp_path / f"{name}.png").is_file(), name
    numbers = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    d = 784
    if overrides["likelihood"].startswith("discretized"):  # a probability of the 8-bit image: no log 256 term
        assert all(r["bits_per_dim"] == pytest.approx(r["loss"] / d / np.log(2)) for r in rows)
        assert numbers["bits_per_dim"] > 0
        assert numbers["elbo"] < 0  # a mass: log-likelihoods are <= 0
    assert numbers["log_px"] >= numbers["elbo"] - 1.0  # IWAE (K=8) on the same images bounds from above


@pytest.mark.slow
def test_cli_trains_a_conv_net_with_blocks_and_mixtures_and_info_counts_parameters(tmp_path, capsys, fashion_dir):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "fashion-mnist", "--limit", "256", "--epochs", "1", "--arch", "conv",
                 "--hidden", "4", "--blocks", "2", "--latent-dim", "3", "--likelihood", "discretized-logistic",
                 "--mixtures", "2", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    model = load_run(out).model
    assert f"encoder: {n_parameters(model.encoder):,} parameters (3 stride-2 stages, channels 4,8,16, 2 " in text
    assert f"decoder: {n_parameters(model.decoder):,} parameters (mirrored, 6 output" in text
    assert "likelihood: 1 parameter(s)" in text
    assert "mixture of 2 per pixel" in text
