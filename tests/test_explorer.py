"""The explorer's server and model side on real trained runs: the API as documented, a battery of malformed
requests (each a 4xx, the server still serving), loopback only, the run directory never written, the CLI's
checks and the static export's choice of decoder. The page itself is tested in a browser in
test_explorer_browser.py."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from explorer_helpers import conv_run, expected_pixels, get, listening_addresses, png_pixels, raw, start_explore
from trained_runs import trained_run
from vaelab import load_run
from vaelab.cli import main
from vaelab.errors import ConfigError
from vaelab.explorer import ExposedWarning, serve, start
from vaelab.explorer.core import Explorer, RequestError, parse_number
from vaelab.explorer.standalone import linear_layers, mlp_spec, write_export


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory, fashion_dir) -> Path:
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(mlp_run):
    srv = start(load_run(mlp_run), port=0, n_codes=1000)
    yield srv
    srv.stop()


# ------------------------------------------------------------------------------------------- the API


def test_info_describes_the_run(server, mlp_run):
    status, ctype, body = get(server.port, "/api/info")
    assert (status, ctype) == (200, "application/json")
    info = json.loads(body)
    assert info["latent_dim"] == 2
    assert info["shape"] == [1, 28, 28]
    assert info["likelihood"] == "gaussian"
    assert info["sigma"] == pytest.approx(0.1)
    assert info["labels"][0] == "T-shirt/top"
    assert len(info["labels"]) == 10
    assert info["n_codes"] == 1000
    assert np.allclose(np.array(info["basis"]) @ np.array(info["basis"]).T, np.eye(2))
    # the plane's circles: N(0, I) in any plane through 0 is N(0, I_2), whose radius r holds 1 − exp(−r²/2)
    radii = info["prior_radii"]
    assert list(radii) == ["68", "95", "99.7"]
    for label, r in radii.items():
        assert 1 - math.exp(-r * r / 2) == pytest.approx(float(label) / 100, abs=1e-4), label


@pytest.mark.slow
def test_a_learned_prior_in_two_dimensions_sends_its_density_instead_of_circles(tmp_path_factory, fashion_dir):
    run = load_run(trained_run(tmp_path_factory, prior="mog", prior_components=8))  # the run test_anatomy uses
    info = Explorer(run, n_codes=300).info()
    assert (info["prior"], info["prior_radii"]) == ("mog", {})
    assert info["prior_text"] == "a mixture of 8 learned Gaussians"
    density = info["prior_density"]
    extent, log_p = density["extent"], np.array(density["log_p"])
    assert log_p.shape == (96, 96)
    assert extent >= 4.0
    cell = 2 * extent / 96
    for i, j in [(0, 0), (10, 70), (48, 47), (95, 3)]:  # row i at z2 = E − (i + ½)·cell, column j at z1
        z = torch.tensor([[-extent + (j + 0.5) * cell, extent - (i + 0.5) * cell]])
        assert log_p[i, j] == pytest.approx(run.model.prior.log_prob(z).item(), abs=1e-3)
    assert np.exp(log_p).sum() * cell**2 == pytest.approx(1.0, abs=0.05)  # the grid holds the prior's mass


def test_decode_is_the_decoder_mean(server):
    model = server.app.ex.model
    z = [[0.3, -1.2], [-2.0, 0.5], [1.5, 1.5]]
    text = ";".join(",".join(str(v) for v in row) for row in z)
    status, ctype, body = get(server.port, f"/api/decode?z={text}")
    assert (status, ctype) == (200, "image/png")
    strip = png_pixels(body)  # (28, 3*28, 1): the codes side by side
    assert strip.shape == (28, 84, 1)
    want = expected_pixels(model, z)
    for k in range(3):
        got = strip[:, 28 * k:28 * (k + 1)].astype(int)
        assert np.abs(got - want[k]).max() <= 1
    assert not np.array_equal(strip[:, :28], strip[:, 28:56])  # different codes, different images


def test_sample_draws_from_the_observation_model(server):
    model = server.app.ex.model
    z = [0.3, -1.2]
    mean = expected_pixels(model, [z])[0].astype(float)

    def draws(query):
        status, ctype, body = get(server.port, f"/api/sample?z=0.3,-1.2&{query}")
        assert (status, ctype) == (200, "image/png")
        return png_pixels(body).astype(float)

    a, b = draws("seed=7&n=3"), draws("seed=7&n=3")
    assert a.shape == (28, 84, 1)
    assert np.array_equal(a, b)  # the seed fixes the draws
    assert not np.array_equal(a, draws("seed=8&n=3"))
    assert not np.array_equal(a[:, :28], a[:, 28:56])  # three different draws
    # the run's σ = 0.1: f(z) + 0.1·ε, seen after clipping to [0, 1]; the residual's spread is about σ
    resid = (a[:, :28] - mean) / 255
    inside = (mean > 40) & (mean < 215)
    assert 0.07 < resid[inside].std() < 0.13
    # another σ changes only the size of the same noise
    small = draws("seed=7&n=3&sigma=0.01")
    assert 0.005 < ((small[:, :28] - mean) / 255)[inside].std() < 0.015
    assert np.abs(draws("seed=7&sigma=0") - mean).max() <= 1  # σ = 0 is f(z) itself


def test_encode_and_image_match_the_model(server):
    ex = server.app.ex
    status, ctype, body = get(server.port, "/api/encode?index=5")
    assert (status, ctype) == (200, "application/json")
    got = json.loads(body)
    with torch.inference_mode():
        q = ex.model.encode(ex.prepare(ex.x[5:6]))
    assert np.allclose(got["mean"], q.mean[0].numpy(), atol=1e-4)
    assert np.allclose(got["std"], q.std[0].numpy(), atol=1e-4)
    assert got["label_name"] == ex.classes[got["label"]]
    status, ctype, body = get(server.port, "/api/image?index=5")
    assert (status, ctype) == (200, "image/png")
    assert np.array_equal(png_pixels(body)[:, :, 0], ex.x[5, 0].numpy())  # uint8 Fashion-MNIST as stored


def test_page_and_assets_are_served(server):
    status, ctype, body = get(server.port, "/")
    assert status == 200
    assert ctype.startswith("text/html")
    assert b"static/explorer.js" in body
    for name in ("explorer.js", "server-backend.js", "explorer.css"):
        status, _, body = get(server.port, f"/static/{name}")
        assert status == 200
        assert len(body) > 100
    page = get(server.port, "/")[2].decode()
    assert "http://" not in page
    assert "https://" not in page  # nothing from elsewhere: works offline


# ------------------------------------------------------------------------------------- malformed requests

BAD_REQUESTS = [  # (path, status, a word of the reason)
    ("/api/decode?z=1", 400, "z has 1 value, but this run's latent dimension is 2: give 2 comma-separated values"),
    ("/api/decode?z=1,2,3", 400, "z has 3 values, but this run's latent dimension is 2"),
    ("/api/decode?z=0,0;1,2,3", 400, "code 2 of z has 3 values, but this run's latent dimension is 2"),
    ("/api/decode?z=", 400, "empty"),
    ("/api/decode", 400, "missing"),
    ("/api/decode?z=nan,1", 400, "number"),
    ("/api/decode?z=inf,1", 400, "number"),
    ("/api/decode?z=-Infinity,1", 400, "number"),
    ("/api/decode?z=1e308,1", 400, "within"),
    ("/api/decode?z=1e999,1", 400, "within"),
    ("/api/decode?z=101,0", 400, "within"),
    ("/api/decode?z=0x10,1", 400, "number"),
    ("/api/decode?z=1_0,1", 400, "number"),
    ("/api/decode?z=abc,def", 400, "number"),
    ("/api/decode?z=" + ";".join(["0,0"] * 65), 400, "at most"),
    ("/api/decode?z=0,0&z=1,1", 400, "twice"),
    ("/api/decode?z=0,0&scale=100", 400, "unknown parameter"),
    ("/api/sample?z=0,0&n=17", 400, "n must"),
    ("/api/sample?z=" + ";".join(["0,0"] * 8) + "&n=16", 400, "at most"),
    ("/api/sample?z=0,0&sigma=-1", 400, "sigma"),
    ("/api/sample?z=0,0&sigma=nan", 400, "sigma"),
    ("/api/sample?z=0,0&sigma=1e9", 400, "sigma"),
    ("/api/sample?z=0,0&seed=-1", 400, "seed"),
    ("/api/sample?z=0,0&seed=99999999999999999999", 400, "seed"),
    ("/api/sample?z=0,0&seed=1.5", 400, "seed"),
    ("/api/encode?index=1000", 400, "index"),
    ("/api/encode?index=-1", 400, "index"),
    ("/api/encode?index=1e3", 400, "index"),
    ("/api/encode?index=", 400, "index"),
    ("/api/encode", 400, "missing"),
    ("/api/image?index=999999999999999999999", 400, "index"),
    ("/api/info?x=1", 400, "unknown parameter"),
    ("/api/decode?z=%ff%fe,1", 400, "query"),
    ("/api/decode?%%%", 400, "query"),
    ("/api/nothing", 404, "no such page"),
    ("/../../etc/passwd", 404, "no such page"),
    ("/static/../../../etc/passwd", 404, "no such page"),
    ("/static/%2e%2e/%2e%2e/etc/passwd", 404, "no such page"),
    ("/%2e%2e/%2e%2e/etc/passwd", 404, "no such page"),
    ("/static/..%2f..%2fvaelab%2fexplorer%2fcore.py", 404, "no such page"),
    ("/static/explorer.js/../../core.py", 404, "no such page"),
    ("/static/", 404, "no such page"),
    ("/static/index.html?x=1", 404, "no such page"),
    ("/index.html?x=1", 400, "no query"),
    ("//etc/passwd", 404, "no such page"),
    ("/etc/passwd%00.js", 404, "no such page"),
]


@pytest.mark.parametrize(("path", "status", "reason"), BAD_REQUESTS, ids=[p[:50] for p, _, _ in BAD_REQUESTS])
def test_malformed_request_gets_a_4xx_reason_and_the_server_keeps_serving(server, path, status, reason):
    got, ctype, body = get(server.port, path)
    text = body.decode()
    assert got == status, text
    assert ctype.startswith("text/plain")
    assert text.count("\n") == 1
    assert reason in text  # one line, naming it
    assert "root:" not in text
    assert "Traceback" not in text
    assert get(server.port, "/api/decode?z=0,0")[0] == 200


RAW_REQUESTS = [  # malformed at the HTTP level, sent as raw bytes
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /api/info HTTP/1.1\r\nHost: evil.example:80\r\n\r\n",
    b"GET http://evil.example/api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"POST /api/decode?z=0,0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\nabc",
    b"DELETE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"BREW /pot HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"GET /api/info HTTP/1.1\r\n" + b"X-Long: " + b"b" * 70000 + b"\r\n\r\n",
    b"GET /\x00\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS hello
]


@pytest.mark.parametrize("data", RAW_REQUESTS, ids=[repr(d[:24]) for d in RAW_REQUESTS])
def test_malformed_http_gets_a_4xx_and_the_server_keeps_serving(server, data):
    data = data.replace(b"Host: 127.0.0.1", f"Host: 127.0.0.1:{server.port}".encode())
    answer = raw(server.port, data)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:200]
    assert b"Traceback" not in answer
    assert get(server.port, "/api/info")[0] == 200


def test_a_z_of_the_wrong_length_names_the_latent_dimension(tmp_path_factory):
    """On a run whose latent dimension is not 2, the docs' plane-style z=0.5,-1.2 is refused in one line that says
    how many values came and how many the run needs; a full z of the run's dimension decodes."""
    srv = start(load_run(conv_run(tmp_path_factory)), port=0, n_codes=50)  # latent dimension 4
    try:
        for path, reason in [("/api/decode?z=0.5,-1.2", "z has 2 values, but this run's latent dimension is 4"),
                             ("/api/sample?z=0.5,-1.2&n=2", "z has 2 values, but this run's latent dimension is 4"),
                             ("/api/decode?z=0,0,0,0;0.5,-1.2", "code 2 of z has 2 values")]:
            status, ctype, body = get(srv.port, path)
            text = body.decode()
            assert (status, ctype) == (400, "text/plain; charset=utf-8"), text
            assert text.count("\n") == 1, text
            assert reason in text
            assert "give 4 comma-separated values per code (a full z, not the 2 coordinates" in text
        status, ctype, body = get(srv.port, "/api/decode?z=0.5,-1.2,0,0.3")
        assert (status, ctype) == (200, "image/png")
        assert png_pixels(body).shape == (64, 64, 3)
    finally:
        srv.stop()


def test_requests_for_another_host_name_are_refused(server):
    """A page elsewhere whose name is made to point at 127.0.0.1 (DNS rebinding) cannot read the API."""
    status, _, body = get(server.port, "/api/info", headers={"Host": f"attacker.example:{server.port}"})
    assert status == 403
    assert b"Host" in body
    assert get(server.port, "/api/info", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_server_listens_on_loopback_only(server):
    assert listening_addresses(server.port) == ["0100007F"]  # 127.0.0.1, nothing on 0.0.0.0 or IPv6


def test_another_host_is_warned_about(mlp_run):
    """Any address but loopback gets a warning before binding. 192.0.2.1 (TEST-NET-1, never this machine's) makes
    binding fail, so the test listens on no outside interface; the failure is one clear error."""
    with pytest.warns(ExposedWarning, match="anyone who can reach"), \
            pytest.raises(ConfigError, match=r"cannot listen on 192\.0\.2\.1"):
        start(load_run(mlp_run), host="192.0.2.1", port=0, n_codes=20)


def test_the_run_directory_is_never_written(mlp_run, tmp_path):
    def snapshot():
        return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path(mlp_run).iterdir()}

    before = snapshot()
    srv = start(load_run(mlp_run), port=0, n_codes=100)
    try:
        for path in ("/api/info", "/api/codes", "/api/decode?z=0,0", "/api/sample?z=0,0&n=2", "/api/encode?index=1",
                     "/api/image?index=1", "/api/decode?z=9999,0"):
            get(srv.port, path)
    finally:
        srv.stop()
    write_export(Explorer(load_run(mlp_run), 100), tmp_path / "x.html")
    assert snapshot() == before


# ----------------------------------------------------------------------------------- the model side


@pytest.mark.parametrize(("text", "ok"), [("0", True), ("-1.5", True), ("+.5", True), ("2e-3", True), ("1.", True),
                                     ("nan", False), ("inf", False), ("1_0", False), ("0x1", False), ("", False),
                                     (" 1", False), ("1e400", False), ("--1", False), ("١", False)])
def test_parse_number_takes_plain_decimals_only(text, ok):
    if ok:
        assert parse_number(text, "v", -10, 10) == float(text)
    else:
        with pytest.raises(RequestError):
            parse_number(text, "v", -10, 10)


@pytest.mark.slow
def test_sigma_is_refused_for_a_bernoulli_run(tmp_path_factory, fashion_dir):
    run = load_run(trained_run(tmp_path_factory, likelihood="bernoulli", binarize="dynamic", epochs=1,
                               limit=1000))
    ex = Explorer(run, 50)
    assert ex.info()["sigma"] is None
    with pytest.raises(RequestError, match="sigma applies to observation models with a scale"):
        ex.sample(np.zeros((1, 2), np.float32), 0.1, 0)
    draw = ex.sample(np.zeros((1, 2), np.float32), None, 0, 4)
    assert set(np.unique(draw)) <= {0, 255}  # binary draws from a Bernoulli


@pytest.mark.slow
def test_export_runs_mlp_decoders_in_the_page_and_grids_the_others(mlp_run, tmp_path_factory, tmp_path):
    mlp = Explorer(load_run(mlp_run), 200)
    spec = mlp_spec(mlp)
    assert spec["kind"] == "mlp"
    assert [lay["relu"] for lay in spec["layers"]] == [True, False]
    conv = Explorer(load_run(conv_run(tmp_path_factory)), 200)
    assert linear_layers(conv.model.decoder) is None
    assert mlp_spec(conv) is None
    out = write_export(conv, tmp_path / "conv.html")
    html = out.read_text()
    data = json.loads(html.split('id="vaelab-data">', 1)[1].split("</script>", 1)[0])
    assert data["decoder"]["kind"] == "grid"
    assert data["decoder"]["n"] % 2 == 1
    assert "http://" not in html
    assert "https://" not in html
    assert [p.name for p in tmp_path.iterdir()] == ["conv.html"]  # written atomically: no temporary left


def test_export_falls_back_to_the_grid_when_the_decoder_is_not_a_plain_stack(mlp_run):
    ex = Explorer(load_run(mlp_run), 50)
    body = ex.model.decoder.body
    body.insert(1, torch.nn.LayerNorm(body[0].out_features))  # a layer the page does not implement
    try:
        assert linear_layers(ex.model.decoder) is None
        assert mlp_spec(ex) is None
        body[1] = torch.nn.Identity()
        assert mlp_spec(ex)["kind"] == "mlp"
        body[1] = torch.nn.ReLU()  # Linear, ReLU, ReLU: same function, still a plain stack
        assert mlp_spec(ex)["kind"] == "mlp"
        body[1] = torch.nn.Tanh()
        assert mlp_spec(ex) is None
    finally:
        del body[1]


@pytest.mark.slow
def test_grid_export_of_a_one_dimensional_latent_space(tmp_path_factory, tmp_path, monkeypatch, fashion_dir):
    from vaelab.explorer import standalone

    ex = Explorer(load_run(trained_run(tmp_path_factory, latent_dim=1, epochs=1, limit=1000)), 100)
    monkeypatch.setattr(standalone, "mlp_spec", lambda ex: None)  # as for a decoder the page cannot run
    html = write_export(ex, tmp_path / "x.html").read_text()
    data = json.loads(html.split('id="vaelab-data">', 1)[1].split("</script>", 1)[0])
    n = data["decoder"]["n"]
    assert data["decoder"]["kind"] == "grid"
    assert n == 65
    assert data["info"]["basis"] == [[1.0]]


# ------------------------------------------------------------------------------------------ the CLI


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "--port must be an integer in 0..65535"),
    (["--port", "-1"], "--port must be"),
    (["--codes", "0"], "--codes must be an integer >= 1"),
    (["--export", "."], "--export must be a file name"),
])
def test_cli_rejects_bad_arguments_in_one_line(mlp_run, capsys, args, message):
    assert main(["explore", str(mlp_run), "--no-browser", *args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_cli_names_a_missing_run(tmp_path, capsys):
    assert main(["explore", str(tmp_path), "--no-browser"]) == 2
    assert "not a vaelab run directory" in capsys.readouterr().err


def test_cli_reports_a_port_in_use(mlp_run, server, capsys):
    assert main(["explore", str(mlp_run), "--no-browser", "--port", str(server.port), "--codes", "10"]) == 2
    assert f"--port {server.port} is in use" in capsys.readouterr().err


def test_cli_stops_on_sigterm_as_on_ctrl_c(mlp_run):
    """`kill` (SIGTERM) ends a served explorer like Ctrl-C: the "stopped" line, exit status 0, the port closed."""
    proc, _, port = start_explore(str(mlp_run), "--no-browser", "--port", "0", "--codes", "200")
    try:
        assert get(port, "/api/info")[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    assert out.strip().splitlines() == ["vaelab explore: stopped"], out
    assert "Traceback" not in err
    with pytest.raises(ConnectionRefusedError):
        get(port, "/api/info")


def test_serve_puts_back_the_sigterm_handler_it_found(mlp_run):
    """The library stops on SIGTERM only while it serves: the handler that was there before is there after."""
    def outer(signum, frame):  # would make serve() fail, not hang, if serve() had installed nothing
        raise RuntimeError("the previous SIGTERM handler ran while the explorer was serving")

    before = signal.signal(signal.SIGTERM, outer)
    urls: list[str] = []
    try:
        def announce(url: str) -> None:
            urls.append(url)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()

        serve(load_run(mlp_run), port=0, open_browser=False, n_codes=50, announce=announce)
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, before)
    port = int(urls[0].rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConnectionRefusedError):  # serve() returned because it stopped
        get(port, "/api/info")


def test_cli_export_writes_one_file(mlp_run, tmp_path, capsys):
    out = tmp_path / "explorer.html"
    with warnings.catch_warnings():
        assert main(["explore", str(mlp_run), "--export", str(out), "--codes", "300"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.stat().st_size > 10_000
    assert os.listdir(tmp_path) == ["explorer.html"]


def test_a_client_that_leaves_mid_answer_is_not_an_error(server, capfd):
    import socket

    for _ in range(5):  # ask for a large answer and close the connection at once
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
            s.sendall(f"GET /api/codes HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
    assert get(server.port, "/api/info")[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_stop_ends_kept_alive_connections_too(mlp_run):
    import http.client

    srv = start(load_run(mlp_run), port=0, n_codes=50)
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/api/info")
    assert conn.getresponse().read()  # HTTP/1.1: the connection stays open
    srv.stop()

    def ask_again() -> bytes:  # the closed connection may fail at either step
        conn.request("GET", "/api/info")
        return conn.getresponse().read()

    with pytest.raises((OSError, http.client.HTTPException)):
        ask_again()
    conn.close()


def test_draws_leave_the_global_random_state_alone(server):
    state = torch.random.get_rng_state()
    server.app.ex.sample(np.zeros((1, 2), np.float32), 0.5, 3, 2)
    assert torch.equal(torch.random.get_rng_state(), state)
