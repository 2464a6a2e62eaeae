"""The ``attnfuse`` command: listing, argument errors, the bench runner's suite table."""

from __future__ import annotations

import subprocess
import sys

from attnfuse import bench, cli


def test_fusions_lists_builtin_names_in_run_order(capsys):
    assert cli.main(["fusions"]) == 0
    assert capsys.readouterr().out.split() == [
        "rope_kv_write", "grouped_decode", "mla_short_prefill", "workspace_overlap"]


def test_unknown_command_and_unknown_suite_are_errors(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert bench.main(["no_such_suite", "--no-plots"]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_bench_knows_every_suite_and_plot_table_names_real_columns():
    suites = bench.suites()
    assert {"rope_kv", "decode", "mla_prefill", "workspace", "e2e"} <= set(suites)
    for stem, *_ in bench.PLOTS:
        assert (bench.RESULTS_DIR / f"{stem}.json").exists(), stem


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "attnfuse.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "bench" in out.stdout
