"""The paper's comparison methods: trained, recorded in MANIFEST.json, run by Cascade."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _vgg_util import random_vgg_like_extractor
from conftest import BUNDLED_WEIGHTS, run_cli
from test_train import _paired_data

from ldct_node.lab.train import METHODS, TrainOptions, train
from ldct_node.model.cascade import Cascade
from ldct_node.model.manifest import WeightsError
from ldct_node.model.networks import NETWORK_BUILDERS
from ldct_node.model.scaling import hu_to_model, model_to_hu


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A, D (reusing A's network), B and C-cnn10 (reusing B's): 1 epoch on tiny data."""
    root = tmp_path_factory.mktemp("methods")
    data = _paired_data(root / "data", cases=2, size=64, n=1)
    extractor = random_vgg_like_extractor(seed=0)
    out: dict[str, Path] = {}
    for method, reuse in (("A", None), ("D", "A"), ("B", None), ("C-cnn10", "B")):
        out[method] = root / method
        train(
            TrainOptions(
                data_dir=data,
                output_dir=out[method],
                epochs_perceptual=1,
                epochs_difference=1,
                batch_size=4,
                learning_rate=1e-4,
                stride=32,
                val_fraction=0.5,
                verbose=0,
                method=method,
                reuse_from=out[reuse] if reuse else None,
            ),
            vgg_extractor=extractor,
        )
    return out


def _net(weights: Path, role: str) -> object:
    manifest = json.loads((weights / "MANIFEST.json").read_text())
    entry = manifest["networks"][role]
    net = NETWORK_BUILDERS[entry["builder"]]()
    net.load_weights(str(weights / entry["file"]))
    return net


def _apply(net: object, x: np.ndarray) -> np.ndarray:
    return np.asarray(net.predict(x, verbose=0), np.float32)  # type: ignore[attr-defined]


def test_manifests_record_the_pipeline(runs: dict[str, Path]) -> None:
    expected = {
        "A": [("difference", "difference", "mse")],
        "D": [("level1", "difference", "mse"), ("level2", "difference", "mse")],
        "B": [("perceptual", "image", "perceptual")],
        "C-cnn10": [("perceptual", "image", "perceptual"), ("difference", "difference", "mse")],
    }
    for method, folder in runs.items():
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert manifest["method"] == method
        got = [(s["network"], s["output"], s["loss"]) for s in manifest["pipeline"]]
        assert got == expected[method]
        assert len(manifest["networks"]) == len(METHODS[method])
        assert manifest["model_version"] != ""
    cnn = json.loads((runs["C-cnn10"] / "MANIFEST.json").read_text())["networks"]["difference"]
    assert cnn["builder"] == "cnn10" and cnn["parameters"] == 335873
    d = json.loads((runs["D"] / "MANIFEST.json").read_text())
    assert d["data"]["reused_stages"] == [str(runs["A"] / "drl_difference.weights.h5")]


def test_reused_stage_is_the_same_network(runs: dict[str, Path]) -> None:
    a = _net(runs["A"], "difference").get_weights()  # type: ignore[attr-defined]
    d1 = _net(runs["D"], "level1").get_weights()  # type: ignore[attr-defined]
    assert all(np.array_equal(x, y) for x, y in zip(a, d1, strict=True))


def test_cascade_runs_each_pipeline_as_recorded(runs: dict[str, Path]) -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(40.0, 30.0, (1, 32, 32)).astype(np.float32)
    x = hu_to_model(hu)[..., None]
    # A: x - difference(x); D: y1 = x - level1(x), y1 - level2(y1); B: perceptual(x).
    a = x - _apply(_net(runs["A"], "difference"), x)
    y1 = x - _apply(_net(runs["D"], "level1"), x)
    d = y1 - _apply(_net(runs["D"], "level2"), y1)
    b = _apply(_net(runs["B"], "perceptual"), x)
    yb = _apply(_net(runs["C-cnn10"], "perceptual"), x)
    c = yb - _apply(_net(runs["C-cnn10"], "difference"), yb)
    for method, expected in (("A", a), ("D", d), ("B", b), ("C-cnn10", c)):
        cascade = Cascade.load(runs[method])
        assert cascade.method == method
        got = cascade.denoise(hu)
        want = model_to_hu(np.clip(expected[..., 0], 0.0, 1.0))
        np.testing.assert_allclose(got, want, atol=0.05, err_msg=method)


def test_manifests_without_a_pipeline_are_the_cascade(tmp_path: Path) -> None:
    assert Cascade.load(BUNDLED_WEIGHTS).method == "C"
    manifest = json.loads((BUNDLED_WEIGHTS / "MANIFEST.json").read_text())
    folder = tmp_path / "w"
    folder.mkdir()
    for entry in manifest["networks"].values():
        (folder / entry["file"]).write_bytes((BUNDLED_WEIGHTS / entry["file"]).read_bytes())
    manifest["pipeline"] = [{"network": "perceptual", "output": "sideways"}]
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="sideways"):
        Cascade.load(folder)
    manifest["pipeline"] = [{"network": "nowhere", "output": "image"}]
    (folder / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="nowhere"):
        Cascade.load(folder)


def test_reuse_needs_the_same_recipe_and_a_shared_stage(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    data = Path(
        json.loads((runs["A"] / "MANIFEST.json").read_text())["recipe"]["data_dir"]
    )  # the same data as the fixture
    common = {"data_dir": data, "epochs_perceptual": 1, "epochs_difference": 1, "batch_size": 4}
    common |= {"learning_rate": 1e-4, "stride": 32, "val_fraction": 0.5, "verbose": 0}
    with pytest.raises(ValueError, match="another recipe"):
        train(
            TrainOptions(
                output_dir=tmp_path / "x", method="D", reuse_from=runs["A"], **{**common, "seed": 5}
            )
        )
    with pytest.raises(ValueError, match="shares no leading stage"):
        train(TrainOptions(output_dir=tmp_path / "y", method="B", reuse_from=runs["A"], **common))
    with pytest.raises(ValueError, match="method"):
        TrainOptions(data_dir=data, output_dir=tmp_path / "z", method="E").validate()
    res = run_cli("train", "--data", data, "--output", tmp_path / "o", "--method", "E")
    assert res.returncode == 2 and "--method" in res.stderr


def _tiny_opts(data: Path, out: Path, **kw: object) -> TrainOptions:
    base: dict[str, object] = {
        "epochs_perceptual": 1,
        "epochs_difference": 1,
        "batch_size": 4,
        "learning_rate": 1e-4,
        "stride": 32,
        "val_fraction": 0.5,
        "verbose": 0,
    }
    base.update(kw)
    return TrainOptions(data_dir=data, output_dir=out, **base)  # type: ignore[arg-type]


def test_init_from_starts_from_earlier_weights(tmp_path: Path, runs: dict[str, Path]) -> None:
    data = _paired_data(tmp_path / "data", cases=2, size=64, n=1)
    # 0 epochs: the network is the earlier run's, unchanged.
    kept = tmp_path / "kept"
    manifest = train(_tiny_opts(data, kept, method="A", epochs_difference=0, init_from=runs["A"]))
    before = _net(runs["A"], "difference").get_weights()  # type: ignore[attr-defined]
    after = _net(kept, "difference").get_weights()  # type: ignore[attr-defined]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert manifest["data"]["initialised_from"]["stages"] == {
        "1": str(runs["A"] / "drl_difference.weights.h5")
    }
    assert manifest["recipe"]["init_from"] == str(runs["A"])

    # Fine-tuning moves the weights by a few optimizer steps from the earlier ones, not
    # from a fresh He-normal start (which differs from them by far more).
    tuned = tmp_path / "tuned"
    train(_tiny_opts(data, tuned, method="A", init_from=runs["A"], lr_schedule="cosine"))
    fresh = NETWORK_BUILDERS["drl_difference"]().get_weights()
    moved = _net(tuned, "difference").get_weights()  # type: ignore[attr-defined]
    # Convolution kernels only: BN moving statistics jump in one step whatever the start.
    step = max(
        float(np.abs(m - b).max()) for m, b in zip(moved, before, strict=True) if m.ndim == 4
    )
    assert 0 < step < 1e-3
    assert float(np.abs(before[0] - fresh[0]).max()) > 0.05

    # A stage with no network of its role and architecture starts from scratch;
    # none at all is an error.
    with pytest.raises(ValueError, match="no network with the role"):
        train(_tiny_opts(data, tmp_path / "none", method="B", init_from=runs["A"]))
    with pytest.raises(ValueError, match="lr_schedule"):
        train(_tiny_opts(data, tmp_path / "bad", method="A", lr_schedule="linear"))


def test_cli_init_from_checks_the_folder(tmp_path: Path) -> None:
    data = _paired_data(tmp_path / "data", cases=2, size=64, n=1)
    result = run_cli(
        "train", "--data", str(data), "--output", str(tmp_path / "o"),
        "--init-from", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2 and "--init-from" in result.stderr
    result = run_cli(
        "train", "--data", str(data), "--output", str(tmp_path / "o"),
        "--lr-schedule", "step",
    )  # fmt: skip
    assert result.returncode == 2 and "--lr-schedule" in result.stderr


def test_cosine_schedule_decays_to_one_percent(tmp_path: Path) -> None:
    from ldct_node.lab.train import _optimizer

    opts = _tiny_opts(tmp_path, tmp_path, learning_rate=1e-3, lr_schedule="cosine")
    optimizer = _optimizer(opts, n_train=40, epochs=2)  # 10 steps per epoch
    lr = []
    for step in (0, 10, 20):
        optimizer.iterations.assign(step)
        lr.append(float(optimizer.learning_rate))
    assert lr == pytest.approx([1e-3, 0.505e-3, 1e-5], rel=1e-3)
    constant = _optimizer(_tiny_opts(tmp_path, tmp_path, learning_rate=1e-3), 40, 2)
    assert float(constant.learning_rate) == pytest.approx(1e-3)
