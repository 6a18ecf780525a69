"""`vidshift demo` end to end on a tiny configuration: every registered head appears in the results table."""
from click.testing import CliRunner

from heads import base as heads
from pipelines.cli import main
from pipelines.demo import demo_runs


def test_demo_trains_every_registered_head_in_each_setting(tmp_path):
    out = tmp_path / "demo"
    arguments = ["demo", "--out", str(out), "--videos-per-class", "3", "--frame-size", "64", "--epochs", "1"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    expected = demo_runs(())
    assert {setting for _, setting in expected} == {"dg", "da"}
    assert {name for name, _ in expected} == set(heads.available())
    table = (out / "results.md").read_text()
    for name, setting in expected:
        assert f"| {name} | {setting} |" in table
        assert (out / "runs" / f"{name}-{setting}" / "metrics.json").is_file()
    rerun = CliRunner().invoke(main, arguments)  # reuses videos, store and finished runs
    assert rerun.exit_code == 0 and "240 extracted" not in rerun.output and "training" not in rerun.output
