"""benchmarks/train_throughput.py on a tiny model on the CPU, and its PyTorch OTAM loss against ours."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.e2e  # a whole benchmark run, JAX and PyTorch
def test_tiny_run_writes_positive_figures_for_both_frameworks(tmp_path):
    bench = load_benchmark("train_throughput")
    out = tmp_path / "throughput.json"
    bench.main([
        "--arch=tiny", "--image_size=32", "--num_frames=4", "--shot=1", "--queries=1",
        "--episodes_per_step=1", "--embed_batch_size=4", "--steps=2", "--warmup=0", "--torch_threads=1",
        "--no-parts", f"--out={out}",  # --parts would compile the backbone's gradient again: slow here
    ])
    result = json.loads(out.read_text())
    frameworks = ("jax", "torch") if bench.torch_available() else ("jax",)
    for framework in frameworks:
        for mode, frames in (("train", 1 * 5 * (1 + 1) * 4), ("embed", 4 * 4)):
            (row,) = [r for r in result["rows"] if r["framework"] == framework and r["mode"] == mode]
            assert row["frames_per_step"] == frames, row
            for key in ("first_call_s", "median_step_s", "frames_per_s", "pipelined_frames_per_s"):
                assert positive(row[key]), (key, row)
            assert row["peak_bytes"] is None  # no device memory statistics on a CPU
    (jax_train,) = [r for r in result["rows"] if r["framework"] == "jax" and r["mode"] == "train"]
    assert math.isfinite(jax_train["loss"]) and positive(jax_train["xla_estimate_bytes"])
    assert result["meta"]["jax"] and result["meta"]["device_kind"]
    if "torch" in frameworks:
        assert result["torch_meta"]["torch"]
        assert {(r["mode"], r["batch"]) for r in result["ratios"]} == {("train", 1), ("embed", 4)}
        assert all(positive(r["jax_over_torch"]) for r in result["ratios"])
    assert "n/a" in bench.format_tables(result)


def test_torch_otam_with_the_papers_columns_is_tam_distance():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchvision")
    import jax
    import jax.numpy as jnp

    from tam_jax import alignment

    otam = load_benchmark("otam_torch")
    rng = np.random.default_rng(0)
    for rows, cols in ((8, 8), (5, 3)):  # square, as trained, and rectangular
        dists = rng.uniform(0, 2, (6, rows, cols))
        ours, our_grad = jax.value_and_grad(lambda d: jnp.sum(alignment.tam_distance(d, 0.1, True)))(
            jnp.asarray(dists, jnp.float32)
        )
        theirs = torch.tensor(dists, requires_grad=True)
        paper = otam.otam_distance(theirs, 0.1, bidirectional=True, public_columns=False)
        paper.sum().backward()
        np.testing.assert_allclose(paper.detach().sum().item(), float(ours), rtol=1e-5)
        np.testing.assert_allclose(theirs.grad.numpy(), np.asarray(our_grad), atol=1e-5)
        # The public code's extra vertical move in the first inner column only adds paths: never larger.
        public = otam.otam_distance(torch.tensor(dists), 0.1, bidirectional=True, public_columns=True)
        assert torch.all(public <= paper.detach() + 1e-9)


def test_start_checks_benchmark_times_both_checks_on_a_tiny_dataset(tmp_path):
    bench = load_benchmark("start_checks")
    result = bench.main(["--dir", str(tmp_path / "data"), "--classes=2,1,1", "--videos=2", "--frames=2",
                         "--size=16x24", "--threads=1"])
    assert [(r["split"], r["videos"], r["read_frame"]) for r in result["rows"]] == [
        ("train", 4, False), ("train", 4, True), ("test", 2, False), ("test", 2, True)]
    assert all(positive(r["check_s"]) for r in result["rows"])
