"""The installed DeepSpeed is inside the range the compat workarounds were written and tested for."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from hp_deepspeed import compat

SETUP_CFG = Path(__file__).resolve().parents[2] / "setup.cfg"


def test_the_installed_deepspeed_is_inside_the_tested_range():
    problem = compat.deepspeed_version_problem()
    assert problem is None, problem


def test_setup_cfg_pins_the_same_range_as_compat():
    requires = configparser.ConfigParser()
    requires.read(SETUP_CFG)
    lines = [line.strip() for line in requires["options"]["install_requires"].splitlines()]
    pin = next(line for line in lines if line.startswith("deepspeed"))
    low, high = compat.DEEPSPEED_SUPPORTED
    assert pin == f"deepspeed>={low},<{high}", (
        f"setup.cfg says {pin!r}; hp_deepspeed/compat/__init__.py DEEPSPEED_SUPPORTED says "
        f">={low},<{high}: change both together")


@pytest.mark.parametrize("version, inside", [
    ("0.19.3", True), ("0.19.8", True), ("0.19.8+cpu", True), ("0.19.10", True),
    ("0.19.2", False), ("0.20.0", False), ("0.20.0rc1", False), ("1.0.0", False), ("0.18.9", False),
])
def test_a_version_outside_the_range_is_named_in_one_line(version, inside):
    problem = compat.deepspeed_version_problem(version)
    if inside:
        assert problem is None
    else:
        assert problem is not None and "\n" not in problem
        assert re.search(rf"DeepSpeed {re.escape(version)} is outside the tested range >=0\.19\.3,<0\.20:", problem)
