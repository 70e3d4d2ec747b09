"""factor_scores: MIG, SAP, DCI, FactorVAE, β-VAE and the per-factor probes, on tables whose answer is known
(codes that are the factors, codes that are noise, codes that mix two factors, a hand-computed 8-row table),
their invariances and one-line errors; then the real path, a `shapes` run evaluated end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import vaelab
from vaelab.analysis.factors import dci, factor_rows
from vaelab.analysis.reporting import Material, figures_for
from vaelab.cli import format_table, main
from vaelab.data import shapes as S

N = 1200
LEVELS = (4, 5, 3)  # three discrete uniform factors
FAST = {"train_votes": 1000, "eval_votes": 500}  # fewer FactorVAE votes and β-VAE points than the defaults


@pytest.fixture(scope="module")
def table():
    rng = np.random.default_rng(0)
    factors = np.stack([rng.integers(0, c, N) for c in LEVELS], 1).astype(np.float64)  # (N, 3)
    return factors


def _identity(f, rng):  # the factors themselves, dims permuted, each scaled and shifted
    return f[:, [2, 0, 1]] * np.array([3.0, -0.5, 7.0]) + np.array([1.0, 10.0, -4.0])


def _identity_plus_noise_dims(f, rng):  # ... and two dimensions of pure noise beside them
    return np.c_[f, rng.normal(size=(len(f), 2))]


def _noise(f, rng):  # independent of the factors
    return rng.normal(size=(len(f), 4))


def _rotated(f, rng):  # factors 0 and 1 rotated by 45°: both dimensions carry both factors
    c = math.cos(math.pi / 4)
    return np.c_[c * (f[:, 0] - f[:, 1]), c * (f[:, 0] + f[:, 1]), f[:, 2]]


K = len(LEVELS)
# (codes, {score: (low, high)}): MIG, SAP, DCI's three, FactorVAE, β-VAE
CASES = {
    "identity": (_identity, {"mig": (0.95, 1), "dci_d": (0.9, 1), "dci_c": (0.9, 1), "dci_i": (0.99, 1),
                             "sap": (0.6, 1), "factorvae": (0.99, 1), "betavae": (0.99, 1)}),
    "identity+noise dims": (_identity_plus_noise_dims, {"mig": (0.95, 1), "dci_d": (0.85, 1), "dci_i": (0.99, 1),
                                                        "factorvae": (0.99, 1), "betavae": (0.99, 1)}),
    # chance for FactorVAE and β-VAE is 1/K: the fixed factor is drawn uniformly
    "noise": (_noise, {"mig": (0, 0.02), "sap": (0, 0.03), "dci_d": (0, 0.2), "dci_c": (0, 0.2),
                       "dci_i": (0, 0.36), "factorvae": (1 / K - 0.07, 1 / K + 0.07),
                       "betavae": (1 / K - 0.07, 1 / K + 0.07)}),
    # mixing two factors loses disentanglement but not information
    "rotated": (_rotated, {"mig": (0, 0.5), "dci_d": (0, 0.75), "dci_i": (0.99, 1), "sap": (0, 0.4)}),
}


def _flat(r: dict) -> dict:
    d = r["dci"]
    return {"mig": r["mig"], "sap": r["sap"], "dci_d": d["disentanglement"], "dci_c": d["completeness"],
            "dci_i": d["informativeness"], "factorvae": r["factorvae"], "betavae": r["betavae"]}


@pytest.mark.parametrize("case", CASES)
def test_scores_land_where_the_construction_puts_them(table, case):
    factors = table
    build, expected = CASES[case]
    scores = _flat(vaelab.factor_scores(build(factors, np.random.default_rng(1)), factors, **FAST))
    for name, (low, high) in expected.items():
        assert low <= scores[name] <= high, f"{case}: {name} = {scores[name]:.3f}, expected in [{low}, {high}]"


def test_mixing_two_factors_costs_disentanglement_but_keeps_information(table):
    factors = table
    plain = vaelab.factor_scores(_identity(factors, None), factors, **FAST)
    mixed = vaelab.factor_scores(_rotated(factors, None), factors, **FAST)
    assert mixed["mig"] < plain["mig"] - 0.4
    assert mixed["dci"]["disentanglement"] < plain["dci"]["disentanglement"] - 0.2
    assert mixed["dci"]["informativeness"] == pytest.approx(plain["dci"]["informativeness"], abs=0.01)
    # the untouched factor keeps its own dimension
    assert mixed["per_factor"]["factor 2"]["mig_gap"] > 0.95


def test_identity_codes_give_each_factor_its_own_dimension(table):
    factors = table
    r = vaelab.factor_scores(_identity(factors, None), factors, names=["a", "b", "c"], **FAST)
    # _identity puts factor 2 in column 0, factor 0 in column 1, factor 1 in column 2
    assert [r["per_factor"][n]["best_dim"] for n in "abc"] == [1, 2, 0]
    for n in "abc":
        p = r["per_factor"][n]
        assert p["kind"] == "discrete"
        assert p["probe_metric"] == "accuracy"
        assert p["probe"] == p["knn"] == 1.0
        assert 0.15 < p["chance"] < 0.45  # the commonest level of 3 to 5 uniform ones
    assert r["factorvae_active_dims"] == 3
    assert np.asarray(r["matrices"]["mi"]).shape == (3, 3)


def _h(*counts: int) -> float:
    """Entropy in nats of a distribution given by counts: −Σ p ln p."""
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts)


def test_mig_and_sap_on_an_8_row_table_match_a_hand_computation():
    f = np.array([[0, 0], [0, 0], [0, 1], [0, 1], [1, 0], [1, 0], [1, 1], [1, 1]], dtype=np.float64)
    z1 = np.array([0, 0, 1, 1, 0, 1, 1, 1], dtype=np.float64)
    codes = np.c_[2 * f[:, 0] - 1, z1, np.full(8, 0.5)]  # z0 = factor 0, z1 half-informative, z2 constant
    # 20 equal-width bins: z0 and z1 take their min and max only, so each is 2 bins; z2 is 1 bin.
    # I(z0; f0) = H(f0) = ln 2, I(z0; f1) = 0 (f0, f1 independent), I(z2; .) = 0.
    # z1 against f0: counts (z1, f0) = (0,0):2 (1,0):2 (0,1):1 (1,1):3; z1 has 3 zeros and 5 ones.
    i_z1_f0 = _h(3, 5) + _h(4, 4) - _h(2, 2, 1, 3)
    # z1 against f1: (0,0):3 (1,0):1 (1,1):4.
    i_z1_f1 = _h(3, 5) + _h(4, 4) - _h(3, 1, 4)
    ln2 = math.log(2)
    mig = ((ln2 - i_z1_f0) / ln2 + (i_z1_f1 - 0.0) / ln2) / 2
    # SAP with continuous factors: R² = cov² / (var var) of each dimension and factor.
    # z1 mean 5/8, var 15/64; f mean 1/2, var 1/4; E[z1 f0] = 3/8, E[z1 f1] = 4/8
    r2_z1_f0 = (3 / 8 - 5 / 16) ** 2 / (15 / 64 * 1 / 4)  # = 1/15
    r2_z1_f1 = (4 / 8 - 5 / 16) ** 2 / (15 / 64 * 1 / 4)  # = 9/15
    sap = ((1.0 - r2_z1_f0) + (r2_z1_f1 - 0.0)) / 2  # = 23/30
    r = vaelab.factor_scores(codes, f, discrete=False, train_votes=50, eval_votes=50, batch_size=4)
    assert r["mig"] == pytest.approx(mig, rel=1e-12)
    assert r["sap"] == pytest.approx(sap, rel=1e-12)
    assert sap == pytest.approx(23 / 30)
    assert r["matrices"]["mi"][1] == pytest.approx([i_z1_f0 / ln2, i_z1_f1 / ln2], rel=1e-12)
    assert r["per_factor"]["factor 0"]["mig_gap"] == pytest.approx((ln2 - i_z1_f0) / ln2, rel=1e-12)
    # the same table with discrete factors: MIG is unchanged (two levels are two bins either way)
    assert vaelab.factor_scores(codes, f, train_votes=50, eval_votes=50, batch_size=4)["mig"] == pytest.approx(mig)


H2_THIRDS = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # entropy in bits of (2/3, 1/3)


@pytest.mark.parametrize(("importance", "d", "c"), [
    ([[1, 0], [0, 1]], 1.0, 1.0),  # one code per factor, one factor per code
    ([[0.5, 0.5], [0.5, 0.5]], 0.0, 0.0),  # every code serves every factor
    # factor 1 split over two codes: each code still serves one factor (D = 1); factor 1's column has
    # entropy ln 2 / ln 3 in base L = 3
    ([[1, 0], [0, 0.5], [0, 0.5]], 1.0, (1 + 1 - math.log(2) / math.log(3)) / 2),
    # code 0 serves both factors (2/3, 1/3) and holds 1.5 of the 2 units of importance; code 1 serves factor 1
    ([[1, 0.5], [0, 0.5]], 0.75 * (1 - H2_THIRDS) + 0.25 * 1.0, (1.0 + 0.0) / 2),
])
def test_dci_of_importance_matrices_with_hand_computed_answers(importance, d, c):
    got_d, got_c, _ = dci(np.asarray(importance, dtype=np.float64))
    assert got_d == pytest.approx(d, abs=1e-9)
    assert got_c == pytest.approx(c, abs=1e-9)


def test_importances_are_shares_of_each_factors_probe_weight():
    """DCI weighs factors equally, as disentanglement_lib's tree importances (which sum to 1 per factor) do:
    a discrete factor's logistic weights, however large, count no more than a continuous factor's."""
    rng = np.random.default_rng(6)
    f = np.c_[rng.integers(0, 4, 1000), rng.random(1000)]
    codes = np.c_[f[:, 0] + 0.3 * f[:, 1], f[:, 1], rng.normal(size=1000)]  # code 0 serves both factors
    r = vaelab.factor_scores(codes, f, **FAST)
    m = np.asarray(r["matrices"]["importance"])
    assert m.sum(0) == pytest.approx([1.0, 1.0])
    assert r["dci"]["disentanglement"] == pytest.approx(dci(m)[0])


def test_permuting_code_dimensions_changes_no_score(table):
    factors = table
    rng = np.random.default_rng(5)
    codes = np.c_[_rotated(factors, None) + 0.3 * rng.normal(size=(N, 3)), rng.normal(size=(N, 2))]
    perm = np.array([3, 0, 4, 2, 1])
    a = vaelab.factor_scores(codes, factors, **FAST)
    b = vaelab.factor_scores(codes[:, perm], factors, **FAST)
    assert _flat(b) == pytest.approx(_flat(a), abs=1e-6)
    for name, p in a["per_factor"].items():
        assert perm[b["per_factor"][name]["best_dim"]] == p["best_dim"]
        assert b["per_factor"][name]["probe"] == pytest.approx(p["probe"], abs=1e-6)


def test_seeded_and_deterministic(table):
    factors = table
    codes = _noise(factors, np.random.default_rng(2))
    a, b = (vaelab.factor_scores(codes, factors, **FAST) for _ in range(2))
    assert json.dumps(a) == json.dumps(b)
    other = vaelab.factor_scores(codes, factors, seed=1, **FAST)
    assert (other["factorvae"], other["betavae"]) != (a["factorvae"], a["betavae"])  # the seed is used
    assert a["settings"]["seed"] == 0
    assert other["settings"]["train_votes"] == 1000
    assert a["settings"]["bins"] == 20


def test_continuous_factors_are_scored_by_r2_and_binned_for_mig():
    rng = np.random.default_rng(3)
    f = np.c_[rng.integers(0, 4, 1000), rng.random(1000)]  # a discrete and a continuous factor
    r = vaelab.factor_scores(np.c_[f[:, 1] * 5, f[:, 0]], f, names=["shape", "size"], **FAST)
    size = r["per_factor"]["size"]
    assert r["settings"]["discrete"] == [True, False]
    assert size["kind"] == "continuous"
    assert size["probe_metric"] == "R²"
    assert size["levels"] == 20  # cut into 20 equal-width bins
    assert size["probe"] > 0.999
    assert size["sap_gap"] > 0.99  # R² 1 on its own dimension, ~0 on the other
    assert size["best_dim"] == 0
    assert r["mig"] > 0.9


def test_nearest_neighbours_find_a_factor_held_along_a_curve():
    """A factor laid on a circle: no straight line reads it (linear R² low), its neighbours do."""
    rng = np.random.default_rng(4)
    x = rng.uniform(0.0, 0.95, 2000)
    f = np.c_[x, rng.integers(0, 3, 2000)]
    codes = np.c_[np.cos(2 * np.pi * x), np.sin(2 * np.pi * x), f[:, 1]]
    p = vaelab.factor_scores(codes, f, **FAST)["per_factor"]["factor 0"]
    assert p["knn"] > 0.97
    assert p["probe"] < p["knn"] - 0.2


def _bad(rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return rng.normal(size=(40, 3)), np.c_[rng.integers(0, 2, 40), rng.integers(0, 3, 40)].astype(float)


CODES, FACTORS = _bad()
NAN_CODES = CODES.copy()
NAN_CODES[7, 1] = np.nan


@pytest.mark.parametrize(("codes", "factors", "kwargs", "needle"), [
    (CODES[:, 0], FACTORS, {}, r"codes must be an \(N, L\) array, got shape \(40,\)"),
    (CODES, FACTORS[:30], {}, r"factors must be an \(N, K\) array with N = 40 rows like codes, got \(30, 2\)"),
    (CODES[:3], FACTORS[:3], {}, "need at least 4 rows"),
    (NAN_CODES, FACTORS, {}, r"codes must be finite; rows \[7\] hold NaN or inf"),
    (CODES, np.c_[FACTORS[:, 0], np.full(40, 2.0)], {}, "factor 'factor 1' takes the single value 2"),
    (CODES, FACTORS, {"names": ["a", "a"]}, "names must be 2 distinct names"),
    (CODES, FACTORS, {"discrete": [True]}, "discrete must be a bool or 2 bools"),
    (CODES, FACTORS, {"bins": 1}, "bins must be an integer >= 2, got 1"),
    (CODES, FACTORS, {"test_share": 1.5}, r"test_share must be in \(0, 1\), got 1.5"),
    (CODES, FACTORS, {"binz": 20}, "unknown setting 'binz'; the settings are bins, factor_bins"),
    (CODES, np.c_[FACTORS[:, 0], np.arange(40)], {"discrete": True}, "factor 'factor 1' has no level shared"),
])
def test_bad_input_gets_a_one_line_error(codes, factors, kwargs, needle):
    with pytest.raises(ValueError, match=needle) as e:
        vaelab.factor_scores(codes, factors, **kwargs)
    assert "\n" not in str(e.value)


def test_rows_for_the_table(table):
    assert factor_rows(None) == []
    factors = table
    r = vaelab.factor_scores(_identity(factors, None), factors, names=["shape", "hue", "bg"], **FAST)
    rows = dict(factor_rows(r))
    assert rows["disentanglement (known factors)"].startswith(f"MIG {r['mig']:.3f} · SAP {r['sap']:.3f}")
    assert rows["  hue from the codes"].startswith("100.0% of held-out images right by a linear probe")
    assert "mostly in z3" in rows["  hue from the codes"]  # column 2, shown 1-based like the traversals


# ------------------------------------------------------------------------------ the real path
@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A `shapes` run (900 images drawn, one epoch of a small MLP), in a cache of its own."""
    tmp = tmp_path_factory.mktemp("shapes")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAELAB_CACHE", str(tmp / "cache"))
        mp.setattr(S, "N_TRAIN", 600)
        mp.setattr(S, "N_TEST", 300)
        run = vaelab.train(vaelab.TrainConfig(dataset="shapes", hidden=[64], latent_dim=6, epochs=1, device="cpu",
                                              out=str(tmp / "run")), progress=False)
        yield run.path, tmp


def test_a_shapes_run_gets_factor_scores_in_eval(shapes_run):
    path, _ = shapes_run
    numbers = vaelab.evaluate(path, iw_samples=2, limit=300, progress=False)
    r = numbers["factor_scores"]
    assert list(r["per_factor"]) == list(S.FACTORS)
    assert r["settings"]["discrete"] == [True, False, False, False, False, False, True]  # shape and background
    assert r["settings"]["rows"] == 300
    flat = [*_flat(r).values(), *(p[k] for p in r["per_factor"].values() for k in ("probe", "knn", "mig_gap"))]
    assert all(0.0 <= v <= 1.0 for v in flat), flat
    assert np.asarray(r["matrices"]["importance"]).shape == (6, 7)
    assert r["per_factor"]["background"]["probe"] > 0.9  # a grey level over the whole image: learnt at once
    assert "disentanglement (known factors)" in format_table(numbers)


@pytest.mark.slow  # draws every figure of the report
def test_the_report_of_a_shapes_run_shows_the_scores_and_their_heat_map(shapes_run):
    path, tmp = shapes_run
    assert main(["plot", str(path), "--only", "factor_scores", "--out", str(tmp / "fig")]) == 0
    assert (tmp / "fig" / "factor_scores.png").stat().st_size > 5000
    html = vaelab.report(path, tmp / "report", iw_samples=2, limit=150, progress=False).read_text()
    assert 'id="factor_scores"' in html
    assert "disentanglement (known factors)" in html
    few = Material.of(vaelab.load_run(path, device="cpu"), 50)  # too few images to score: no heat map
    assert "factors" in figures_for(few)
    assert "factor_scores" not in figures_for(few)


def test_data_without_factors_gets_no_scores_and_no_rows(tmp_path):
    np.savez(tmp_path / "plain.npz", x=np.random.default_rng(0).integers(0, 256, (150, 1, 8, 8), dtype=np.uint8))
    plain = vaelab.train(vaelab.TrainConfig(dataset=str(tmp_path / "plain.npz"), hidden=[16], latent_dim=2,
                                            epochs=1, device="cpu", out=str(tmp_path / "plain")), progress=False)
    numbers = vaelab.evaluate(plain.path, iw_samples=2, progress=False)
    assert numbers["factor_scores"] is None
    assert "known factors" not in format_table(numbers)
