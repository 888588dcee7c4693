"""The private parts of mlx-lm expertmesh relies on live in one module, and an
mlx-lm outside the range they were checked on is named clearly."""

import ast
from pathlib import Path

import pytest

from expertmesh import mlxlm

PACKAGE = Path(__file__).resolve().parents[1]


def test_the_installed_mlx_lm_is_in_the_supported_range():
    mlxlm.check_version()


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "1.0"])
def test_an_mlx_lm_outside_the_range_is_refused_saying_what_to_install(version):
    with pytest.raises(RuntimeError, match=rf"mlx-lm {version} is installed: pip install 'mlx-lm>=0.32,<0.33'"):
        mlxlm.check_version(version)


def test_no_other_module_reaches_into_mlx_lm_privates_or_swaps_classes():
    offenders = []
    for path in [*PACKAGE.glob("expertmesh/**/*.py"), *PACKAGE.glob("nodes/*.py"), *PACKAGE.glob("discovery/*.py")]:
        if path.name == "mlxlm.py" or "/v1/" in str(path):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_lm"):
                offenders += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
            if isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store):
                offenders.append(f"{path.name}: __class__ =")
    assert offenders == []
