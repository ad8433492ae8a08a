"""Fidelity to the paper (Cao et al., CVPR 2020) and its documented departures: the Diagonal scorer, the
dataset configs' preprocessing and test episodes, the published numbers, Table 2's two readings, the
per-scorer logit scale, and the edges of lam and the learned temperature."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tam_jax import alignment, evaluate, fewshot, hosts, methods, models, reproduce, train_state
from tam_jax.config_checks import validate
from tam_jax.configuration import default_config, eval_queries
from tests.helpers import load_config, tiny_config

DATASETS = ("kinetics", "ssv2_full", "ssv2_small", "ucf101", "hmdb51")


def test_diagonal_is_the_mean_of_the_diagonal():
    dist = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=(2, 3, 5, 5)), jnp.float32)
    expected = np.mean(np.diagonal(np.asarray(dist), axis1=-2, axis2=-1), axis=-1)
    np.testing.assert_allclose(alignment.diagonal_distance(dist), expected, rtol=1e-6)
    assert float(alignment.diagonal_distance(jnp.full((8, 8), 2.0))) == pytest.approx(2.0)  # [0, 2]
    grad = jax.grad(lambda d: alignment.diagonal_distance(d))(jnp.zeros((4, 4)))
    np.testing.assert_allclose(grad, np.eye(4) / 4)


@pytest.mark.parametrize("dataset", DATASETS)
def test_dataset_configs_carry_the_papers_preprocessing_and_test_episodes(dataset):
    config = load_config(dataset, "shot=5")
    assert config.data.square_resize and (config.data.resize, config.data.image_size) == (256, 224)
    assert config.eval.queries == 1 and eval_queries(config) == 1  # n queries: one per class
    assert config.eval.num_episodes == 10_000
    assert config.fewshot.queries == 5  # training's own count
    assert (config.fewshot.way, config.fewshot.shot) == (5, 5)


def test_evaluation_queries_default_to_trainings():
    config = default_config()
    assert config.eval.queries == 0 and eval_queries(config) == config.fewshot.queries == 5
    config.eval.queries = 2
    assert eval_queries(config) == 2
    config = tiny_config()
    config.eval.queries = -1
    with pytest.raises(ValueError, match=r"config\.eval\.queries"):
        validate(config)


def test_validation_episodes_use_the_evaluation_query_count(monkeypatch):
    config = tiny_config()
    config.eval.queries = 1
    seen = {}

    def fake_evaluate_embeddings(embeddings, labels, **kwargs):
        seen.update(kwargs)
        return {kwargs["scorers"][0].name: np.array([1.0])}

    from tam_jax.data.report import SkipReport

    monkeypatch.setattr(evaluate, "evaluate_embeddings", fake_evaluate_embeddings)
    validator = evaluate.FewShotEvaluator.for_validation(
        config, hosts.make_mesh(1), models.build_embedder(config.model), SkipReport())
    embedded = evaluate.Embedded(np.zeros((10, 4, 8), np.float32), np.arange(10))
    assert validator.score(embedded)[0]["accuracy"] == 1.0
    assert seen["queries"] == 1 != config.fewshot.queries


# ----------------------------------------------------------------------------------------------------
# lam and the temperature at their edges.


@pytest.mark.parametrize("zero", [0, 0.0, np.float32(0), np.array(0.0), jnp.float32(0), jnp.zeros(())])
def test_lam_zero_in_any_form_is_the_hard_minimum(zero):
    dist = jnp.asarray(np.random.default_rng(1).uniform(0, 2, size=(3, 4, 5)), jnp.float32)
    hard = alignment.tam_distance(dist, lam=0)
    got = alignment.tam_distance(dist, lam=zero)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, hard, rtol=1e-6)
    np.testing.assert_allclose(alignment.plain_dtw_distance(dist, lam=zero),
                               alignment.plain_dtw_distance(dist, lam=0), rtol=1e-6)


def test_traced_lam_zero_is_the_hard_minimum_with_finite_gradients():
    dist = jnp.asarray(np.random.default_rng(2).uniform(0, 2, size=(3, 4, 4)), jnp.float32)
    score = jax.jit(lambda d, lam: alignment.tam_distance(d, lam).sum())
    np.testing.assert_allclose(score(dist, 0.0), alignment.tam_distance(dist, lam=0).sum(), rtol=1e-6)
    grads = jax.jit(jax.grad(lambda d, lam: alignment.tam_distance(d, lam).sum(), argnums=(0, 1)))(dist, 0.0)
    assert all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(score(dist, 0.1), alignment.tam_distance(dist, lam=0.1).sum(), rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.1, np.float32(-0.1), np.array(-1.0), jnp.float32(-0.5), float("nan")])
def test_negative_or_nan_lam_is_rejected_whatever_its_type(bad):
    for fn in (alignment.tam_distance, alignment.plain_dtw_distance):
        with pytest.raises(ValueError, match="lam must be >= 0"):
            fn(jnp.zeros((3, 3)), lam=bad)


def test_non_scalar_lam_is_rejected():
    with pytest.raises(ValueError, match="lam must be a scalar"):
        alignment.tam_distance(jnp.zeros((2, 3, 3)), lam=np.array([0.1, 0.2]))


def test_learned_temperature_is_clamped_to_its_bounds():
    low, high = 0.01, 100.0
    for log_t, expected in [(0.0, 1.0), (-50.0, low), (50.0, high), (1e6, high)]:
        got = fewshot.bounded_temperature(jnp.float32(log_t), low, high)
        assert float(got) == pytest.approx(expected, rel=1e-5)
    outside = jax.grad(lambda x: fewshot.bounded_temperature(x, low, high))(jnp.float32(-50.0))
    inside = jax.grad(lambda x: fewshot.bounded_temperature(x, low, high))(jnp.float32(0.5))
    assert float(outside) == 0.0 and float(inside) == pytest.approx(np.exp(0.5), rel=1e-5)
    with pytest.raises(ValueError, match="min_temperature"):
        fewshot.bounded_temperature(jnp.float32(0.0), 0.0, 1.0)


def test_train_temperature_applies_the_bounds_and_the_logit_scale():
    config = tiny_config()  # T = 4 frames
    config.fewshot.learn_temperature = True
    config.fewshot.max_temperature = 10.0
    params = {"log_temperature": jnp.float32(20.0)}  # e^20, pushed far beyond the bound
    assert float(train_state.temperature(params, config)) == pytest.approx(10.0)  # TAM: scale 1
    config.fewshot.scorer = "tsn"
    assert float(train_state.temperature(params, config)) == pytest.approx(10.0 / 4)
    config.fewshot.logit_scale = "none"
    assert float(train_state.temperature(params, config)) == pytest.approx(10.0)
    config.fewshot.learn_temperature = False
    config.fewshot.temperature = 0.5
    assert float(train_state.temperature({}, config)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("min_temperature", 0.0, "min_temperature"), ("max_temperature", 0.001, "min_temperature"),
     ("temperature", 1000.0, r"fewshot\.temperature"), ("logit_scale", "learned", r"fewshot\.logit_scale")],
)
def test_temperature_and_scale_config_errors_name_the_key(key, value, match):
    config = tiny_config()
    config.fewshot.learn_temperature = True
    config.fewshot[key] = value
    with pytest.raises(ValueError, match=match):
        validate(config)


def test_logit_scale_per_scorer():
    for scorer in methods.names():
        baseline = scorer in ("tsn", "trn", "cmn")  # Table 1's: T; Table 2's: Eq. 8 as the paper trains them
        assert methods.logit_scale(scorer, 8) == (8.0 if baseline else 1.0), scorer
        summing = scorer in ("tam", "plain_dtw", "trx")  # [0, 2T], and TRX's unbounded squared distances
        assert methods.logit_scale(scorer, 8, "frames") == (1.0 if summing else 8.0), scorer
        assert methods.logit_scale(scorer, 8, "none") == 1.0
    with pytest.raises(ValueError, match="logit_scale"):
        methods.logit_scale("tam", 8, "auto")
    with pytest.raises(ValueError, match="otam"):
        methods.logit_scale("otam", 8)


# ----------------------------------------------------------------------------------------------------
# The tables: published numbers and Table 2's two readings.


def test_published_numbers_are_the_papers():
    table1 = {"matching_net": (53.3, 74.6, None, None), "maml": (54.2, 75.3, None, None),
              "cmn_paper": (60.5, 78.9, None, None), "tsn": (64.5, 77.9, 33.6, 43.0),
              "cmn": (65.4, 78.8, 34.4, 43.8), "trn": (68.4, 82.0, 38.6, 48.9),
              "tam": (73.0, 85.8, 42.8, 52.3)}
    table2 = {"min": (52.4, 71.6, 29.7, 38.5), "mean": (67.8, 78.9, 35.2, 45.3),
              "diagonal": (66.2, 79.3, 38.3, 48.7), "plain_dtw": (69.2, 80.6, 39.6, 49.0),
              "tam": (73.0, 85.8, 42.8, 52.3)}
    published = lambda row: tuple(reproduce._published(key, row, shot)
                                  for key in ("kinetics", "ssv2_full") for shot in (1, 5))
    for row, numbers in {**table1, **table2}.items():
        assert published(row) == numbers, row
    # TRX (Perrett et al., CVPR 2021, Table 1): 5-way 5-shot only.
    assert [reproduce._published(key, "trx", 5) for key in ("kinetics", "ssv2_full", "hmdb51", "ucf101")] == [
        85.9, 64.6, 75.6, 96.1]
    assert reproduce._published("kinetics", "trx", 1) is None


def test_table1_on_a_paper_dataset_lists_the_quoted_rows_untrained(tmp_path):
    cells = {(s, k): reproduce.Cell(s, k, 0.5, 0.01, 100, 7, str(tmp_path / f"{s}_{k}shot"))
             for s, _ in reproduce.table_rows(1) for k in (1, 5)}
    text = reproduce.format_markdown(1, reproduce.table_rows(1), (1, 5), cells, "ssv2_full")
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| Matching Net (quoted)", "| MAML (quoted)", "| CMN (quoted)", "| TSN++", "| CMN++", "| TRN++",
        "| TAM", "| TRX"]
    assert rows[0] == "| Matching Net (quoted) | not trained | - | not trained | - |"
    assert rows[-2] == "| TAM | 50.0 ± 1.0 | 42.8 | 50.0 ± 1.0 | 52.3 |"
    assert rows[-1] == "| TRX | 50.0 ± 1.0 | - | 50.0 ± 1.0 | 64.6 |"
    reproduce.write_table(str(tmp_path), 1, reproduce.table_rows(1), (1, 5), cells, "kinetics")
    csv_lines = (tmp_path / "table1.csv").read_text().splitlines()
    assert csv_lines[1] == "Matching Net,,,,53.3,,,74.6,"
    assert csv_lines[-2] == "TAM,tam,50.00,1.00,73.0,50.00,1.00,85.8,100"
    assert csv_lines[-1] == "TRX,trx,50.00,1.00,,50.00,1.00,85.9,100"


@pytest.mark.parametrize("train_each", [False, True])
def test_table2_trains_one_tam_run_or_one_run_per_scorer(tmp_path, monkeypatch, train_each):
    runs = []

    def fake_train_and_score(config, workdir, scorers):
        runs.append((config.fewshot.scorer, workdir.rsplit("/", 1)[-1], tuple(scorers)))
        return {s: reproduce.Cell(s, config.fewshot.shot, 0.5, 0.01, 10, 1, workdir) for s in scorers}

    monkeypatch.setattr(reproduce, "train_and_score", fake_train_and_score)
    reproduce.reproduce(tiny_config(), str(tmp_path), table=2, shots=(1,), train_each=train_each)
    names = [s for s, _ in reproduce.table_rows(2)]
    if train_each:
        assert runs == [(s, f"{s}_1shot", (s,)) for s in names]
        assert "each trained with its own scorer" in (tmp_path / "table2_train_each.md").read_text()
        assert not (tmp_path / "table2.md").exists()
    else:
        assert runs == [("tam", "tam_1shot", tuple(names))]
        assert "on the same TAM-trained features" in (tmp_path / "table2.md").read_text()
    with pytest.raises(ValueError, match="--train-each"):
        reproduce.reproduce(tiny_config(), str(tmp_path), table=1, shots=(1,), train_each=True)
