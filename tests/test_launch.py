"""Sweeps: every combination becomes a command; a mistyped key fails before anything launches."""

import shlex

import pytest

from launch import sweep


def test_grid_expands_to_one_command_per_combination():
    grid = sweep.parse_grid(["optimizer.learning_rate=1e-4,3e-4", "flow.shift=3,5,7"])
    lines = sweep.commands("configs/tiny.py", "/runs/s", grid)
    assert len(lines) == 6
    argv = shlex.split(lines[-1])
    assert argv[-2:] == ["--config.optimizer.learning_rate=3e-4", "--config.flow.shift=7"]
    assert argv[argv.index("--workdir") + 1] == "/runs/s/learning_rate3e-4_shift7"
    assert len({shlex.split(line)[argv.index("--workdir") + 1] for line in lines}) == 6


def test_mistyped_key_is_rejected_naming_it():
    with pytest.raises(KeyError, match="learnin_rate"):
        sweep.commands("configs/tiny.py", "/runs/s", sweep.parse_grid(["optimizer.learnin_rate=1"]))
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_grid(["seed"])
