"""`tnt models` and the command line's conventions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tnt_vision.cli import main


def test_models_table_has_measured_and_paper_numbers(capsys) -> None:
    assert main(["models", "tnt_s_patch16_224", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["name"] == "tnt_s_patch16_224"
    assert abs(row["params_m"] - 23.8) < 0.1
    assert abs(row["flops_g"] - 5.2) < 0.05
    assert abs(row["eq17_flops_g"] - 12 * 0.429) < 0.01
    assert (row["paper_params_m"], row["paper_flops_g"]) == (23.8, 5.2)


def test_models_table_is_printed(capsys) -> None:
    assert main(["models", "tnt_ti*"]) == 0
    out = capsys.readouterr().out
    assert "tnt_ti_patch16_224" in out
    assert "6.1M" in out


def test_bad_flag_exits_2() -> None:
    with pytest.raises(SystemExit) as e:
        main(["models", "--no-such-flag"])
    assert e.value.code == 2


def test_console_entry_point_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tnt_vision", "models", "deit_ti*", "--json"], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout)["name"] == "deit_ti_patch16_224"
