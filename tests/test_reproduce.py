"""The table harness end to end on the demo at a tiny size: Table 1's runs, resuming, Table 2 from the CLI."""

import csv
import subprocess
import sys

import ml_collections
import pytest

from tam_jax import eval_workdir, reproduce, train
from tam_jax.checkpoints import read_config
from tests.helpers import REPO, flags_for, tiny_config


def tiny_table_config():
    config = tiny_config(num_steps=2)
    config.mesh.num_devices = 1
    config.train.episodes_per_step = 2
    config.train.val_every_steps = 0
    config.eval.num_episodes = 20
    config.methods = ml_collections.ConfigDict({name: {"dim": 16} for name in ("trn", "cmn", "trx")})
    return config


@pytest.mark.e2e  # four whole runs, then tam_jax.reproduce as a process
def test_tables_train_every_run_once_then_reuse_it(tmp_path, monkeypatch):
    config = tiny_table_config()
    cells = reproduce.reproduce(config, str(tmp_path), table=1, shots=(1,))
    assert sorted(cells) == [("cmn", 1), ("tam", 1), ("trn", 1), ("trx", 1), ("tsn", 1)]
    for (scorer, _), cell in cells.items():
        assert cell.workdir == str(tmp_path / f"{scorer}_1shot") and cell.checkpoint_step == 2
        assert cell.episodes == 20 and 0 <= cell.accuracy <= 1 and cell.ci95 > 0
    markdown = (tmp_path / "table1.md").read_text()
    assert [line.split(" | ")[0] for line in markdown.splitlines() if line.startswith("| ")][1:] == [
        "| TSN++", "| CMN++", "| TRN++", "| TAM", "| TRX"
    ]
    assert "(paper)" not in markdown  # the demo is not one of the paper's datasets
    rows = list(csv.DictReader((tmp_path / "table1.csv").open()))
    assert [r["scorer"] for r in rows] == ["tsn", "cmn", "trn", "tam", "trx"]
    # TRX trains as its paper does: gradients averaged over 16 episodes a step.
    assert read_config(tmp_path / "trx_1shot").train.episodes_per_step == 16
    assert float(rows[0]["1-shot"]) == pytest.approx(100 * cells[("tsn", 1)].accuracy, abs=0.01)

    # Finished runs with saved results are neither retrained nor re-evaluated.
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    with monkeypatch.context() as patch:
        patch.setattr(train, "train", fail)
        patch.setattr(eval_workdir, "evaluate_workdir", fail)
        assert reproduce.reproduce(config, str(tmp_path), table=1, shots=(1,)) == cells

    # Table 2 from the command line: the TAM run is Table 1's, scored with every alignment scorer.
    command = [sys.executable, "-m", "tam_jax.reproduce", "--config=configs/demo.py", f"--workdir={tmp_path}",
               "--table=2", "--shots=1", "--paper=ssv2_full", *flags_for(config)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "tam_1shot" / "checkpoints" / "3").exists()
    rows = list(csv.DictReader((tmp_path / "table2.csv").open()))
    assert [r["scorer"] for r in rows] == ["min", "mean", "diagonal", "plain_dtw", "tam"]
    assert [r["1-shot paper"] for r in rows] == ["29.7", "35.2", "38.3", "39.6", "42.8"]
    assert rows[-1]["1-shot"] == f"{100 * cells[('tam', 1)].accuracy:.2f}"  # the same episodes as Table 1
    assert "| TAM | " in (tmp_path / "table2.md").read_text()

    # More steps: the unfinished run is handed to train.train, which resumes it (tests/test_train.py).
    config.train.num_steps = 3
    trained = []
    monkeypatch.setattr(train, "train", lambda run, workdir: trained.append((run.fewshot.scorer, workdir)))
    reproduce.reproduce(config, str(tmp_path), table=1, shots=(1,), scorers=("tsn",))
    assert trained == [("tsn", str(tmp_path / "tsn_1shot"))]

    # A run trained with another config is not silently mixed into the table.
    config.fewshot.temperature = 0.5
    with pytest.raises(ValueError, match=r"fewshot.temperature=1.0 \(now 0.5\).*another --workdir"):
        reproduce.reproduce(config, str(tmp_path), table=1, shots=(1,), scorers=("tsn",))


def test_table_layout_published_numbers_and_errors():
    cell = reproduce.Cell("tam", 1, 0.5, 0.01, 100, 7, "runs/x/tam_1shot")
    cells = {(s, k): cell for s, _ in reproduce.table_rows(1) for k in (1, 5)}
    text = reproduce.format_markdown(1, reproduce.table_rows(1), (1, 5), cells, "kinetics")
    assert "| scorer | 1-shot | 1-shot (paper) | 5-shot | 5-shot (paper) |" in text
    assert "| TAM | 50.0 ± 1.0 | 73.0 | 50.0 ± 1.0 | 85.8 |" in text
    assert "| TSN++ | 50.0 ± 1.0 | 64.5 | 50.0 ± 1.0 | 77.9 |" in text
    assert "| MAML (quoted) | not trained | 54.2 | not trained | 75.3 |" in text  # from CMN's paper
    assert "| TRX | 50.0 ± 1.0 | - | 50.0 ± 1.0 | 85.9 |" in text  # Perrett et al.: 5-shot only
    assert "Perrett et al., CVPR 2021" in text and "Cao et al., CVPR 2020" in text
    for dataset, trx in (("ssv2_full", "64.6"), ("ucf101", "96.1"), ("hmdb51", "75.6")):
        text = reproduce.format_markdown(1, reproduce.table_rows(1), (1, 5), cells, dataset)
        assert f"| TRX | 50.0 ± 1.0 | - | 50.0 ± 1.0 | {trx} |" in text, dataset
    config = tiny_config()
    assert reproduce.dataset_key(config) is None
    config.data.tfds_name = "ssv2_fewshot/full"
    assert reproduce.dataset_key(config) == "ssv2_full"
    assert reproduce.dataset_key(config, "none") is None
    with pytest.raises(ValueError, match="--scorers"):
        reproduce.table_rows(2, ("trn",))
    assert reproduce.run_config(config, "cmn", 5, ("cmn",)).eval.scorers == "cmn"
    trx = reproduce.run_config(config, "trx", 5, ("trx", "tam"))  # TRX's paper: 16 episodes a step
    assert trx.train.episodes_per_step == 16 and trx.eval.scorers == "trx,tam"
    assert reproduce.run_config(config, "tam", 5, ("tam",)).train.episodes_per_step == 8
