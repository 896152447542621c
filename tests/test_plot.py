"""`impala plot`: the image is written and not blank, seeds of one configuration are grouped,
a torn last line of metrics.jsonl is tolerated, and bad input is one line and exit code 2."""

import io
import json
import os

import numpy as np
import pytest

from impala.cli import main
from impala.errors import ConfigError
from impala.plot import mean_curve, plot

BASE_CONFIG = {
    "env": "CartPole-v1",
    "seed": 0,
    "run_dir": None,
    "total_steps": 10_000,
    "learning_rate": 0.001,
    "entropy_cost": 0.01,
    "log_interval": 5.0,
    "device": "cpu",
}


def make_run(folder, *, seed=0, records=20, torn_tail="", **settings):
    """A fake run folder: config.json and a rising return curve in metrics.jsonl (the first
    record has no return yet, as a real run's first ones may not)."""
    folder.mkdir(parents=True)
    config = {**BASE_CONFIG, **settings, "seed": seed, "run_dir": str(folder)}
    config["log_interval"] = 1.0 + seed  # a logging setting: does not split a group
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    lines = []
    for i in range(records):
        steps = 500 * (i + 1) + 37 * seed  # seeds log at different steps and times
        ret = None if i == 0 else 10.0 + i * 5.0 + seed
        record = {"time": 0.5 * (i + 1) + 0.1 * seed, "steps": steps, "return_mean": ret}
        lines.append(json.dumps({**record, "loss": 1.0 / (i + 1)}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n" + torn_tail)
    return folder


@pytest.fixture
def runs(tmp_path):
    """Two seeds of one configuration and one run of another."""
    return [
        make_run(tmp_path / "a0", seed=0),
        make_run(tmp_path / "a1", seed=1),
        make_run(tmp_path / "b0", seed=0, learning_rate=0.0005),
    ]


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_writes_the_figure_with_seeds_grouped(runs, tmp_path, capsys):
    output = tmp_path / "curves.png"
    figures = plot(runs, output, title="CartPole")
    image = read_png(output)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[1] > image.shape[0] > 200  # two panels side by side: wider than tall
    assert image[..., :3].std() > 0.05  # not a blank canvas
    assert [g["runs"] for g in figures["groups"]] == [2, 1]
    labels = [g["label"] for g in figures["groups"]]
    assert labels == ["CartPole-v1 lr=0.001 (2 seeds)", "CartPole-v1 lr=0.0005"]
    assert figures["runs"] == 3 and figures["skipped"] == []
    captured = capsys.readouterr()
    assert captured.out == f"plot: 3 runs (2 groups) -> {output}\n"
    assert captured.err == ""


def test_one_panel(runs, tmp_path):
    both, steps = tmp_path / "both.png", tmp_path / "steps.png"
    plot(runs, both)
    plot(runs, steps, x="steps")
    assert read_png(steps).shape[1] < read_png(both).shape[1]


def test_mean_over_the_common_range():
    xs = [np.array([0.0, 10.0]), np.array([5.0, 20.0])]
    ys = [np.array([0.0, 10.0]), np.array([5.0, 20.0])]
    grid, mean, low, high = mean_curve(xs, ys, points=6)
    assert grid[0] == 5.0 and grid[-1] == 10.0  # the range both cover
    np.testing.assert_allclose(mean, grid)
    np.testing.assert_allclose(low, high)
    assert mean_curve([np.array([0.0, 1.0]), np.array([2.0, 3.0])], ys) is None


def test_a_torn_last_line_is_ignored(tmp_path, capsys):
    run = make_run(tmp_path / "killed", torn_tail='{"time": 11.0, "steps": 105')
    figures = plot([run], tmp_path / "out.png")
    assert figures["groups"] == [{"label": "CartPole-v1", "runs": 1, "run_dirs": [str(run)]}]
    assert capsys.readouterr().err == ""


def test_a_run_without_returns_is_skipped_with_a_warning(runs, tmp_path, capsys):
    early = make_run(tmp_path / "early", records=1)  # its only record has no return yet
    figures = plot([*runs, early], tmp_path / "out.png")
    assert figures["runs"] == 3 and figures["skipped"] == [str(early)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and str(early) in err
    with pytest.raises(ConfigError, match="no run has return records yet"):
        plot([early], tmp_path / "none.png")


def test_the_cli(runs, tmp_path, capsys):
    output = tmp_path / "cli.png"
    code = main(["plot", *map(str, runs), "-o", str(output), "--x", "time", "--title", "T"])
    assert code == 0
    assert capsys.readouterr().out == f"plot: 3 runs (2 groups) -> {output}\n"
    assert read_png(output).shape[0] > 200


def bad_inputs(tmp_path, good):
    no_metrics = tmp_path / "no-metrics"
    no_metrics.mkdir()
    (no_metrics / "config.json").write_text(json.dumps(BASE_CONFIG))
    binary = make_run(tmp_path / "binary")
    (binary / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    not_json = make_run(tmp_path / "not-json")
    (not_json / "metrics.jsonl").write_text("steps 100 return 5\nsteps 200 return 6\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    png = str(tmp_path / "out.png")
    return [
        ([str(no_metrics), "-o", png], "holds no metrics.jsonl"),
        ([str(binary), "-o", png], "cannot read"),
        ([str(not_json), "-o", png], "is not a metrics log"),
        ([str(empty), "-o", png], "is not a run folder (it holds no config.json)"),
        ([str(tmp_path / "nowhere"), "-o", png], "is not a run folder"),
        ([str(tmp_path), "-o", png], "it holds run folders: give them"),
        ([good, "-o", str(tmp_path / "no-such-folder" / "out.png")], "does not exist"),
        ([good, "-o", str(tmp_path / "out.xyz")], "cannot write '.xyz' files"),
        ([good, "-o", str(tmp_path / "out")], "has no suffix"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(runs, tmp_path, capsys):
    for args, message in bad_inputs(tmp_path, str(runs[0])):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plot([args[0]], args[2])
        capsys.readouterr()
        assert main(["plot", *args]) == 2, args
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith("impala plot: error: ") and message in captured.err
        assert captured.err.count("\n") == 1, captured.err
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def test_without_o_the_plot_goes_in_the_run_folder_and_says_where(
    runs, tmp_path, capsys, monkeypatch
):
    """A new user's first `impala plot RUN`: RUN/plot.png; several runs: plot.png here."""
    assert main(["plot", str(runs[0])]) == 0
    assert capsys.readouterr().out == (
        f"plot: 1 run (1 group) -> {runs[0] / 'plot.png'} (the default; -o FILE to choose)\n"
    )
    assert read_png(runs[0] / "plot.png").shape[0] > 200
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["plot", *map(str, runs)]) == 0
    assert capsys.readouterr().out.endswith("-> plot.png (the default; -o FILE to choose)\n")
    assert read_png(here / "plot.png").shape[0] > 200
    assert plot([runs[1]], out=io.StringIO())["output"] == str(runs[1] / "plot.png")
    # A folder that is no run: its own error, not one about where the image would go.
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert "is not a run folder" in capsys.readouterr().err
