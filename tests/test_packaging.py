"""What ships: fresh stubs, an expertmesh-only wheel, a small public API."""

import subprocess
import sys
import zipfile

import expertmesh

from conftest import REPO


def test_generated_stubs_match_the_protos(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(REPO / "protos"),
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    str(REPO / "protos/expertmesh/v1/expertmesh.proto")], check=True)
    for name in ("expertmesh_pb2.py", "expertmesh_pb2.pyi", "expertmesh_pb2_grpc.py"):
        fresh = (tmp_path / "expertmesh/v1" / name).read_text()
        committed = (REPO / "expertmesh/v1" / name).read_text()
        assert fresh == committed, f"expertmesh/v1/{name} is stale: run `make proto`"


def test_wheel_installs_nothing_but_the_expertmesh_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("expertmesh-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"expertmesh", next(t for t in tops if t.endswith(".dist-info"))}
    names = zipfile.ZipFile(wheel).namelist()
    assert "expertmesh/nodes/daemon.py" in names
    assert "expertmesh/discovery/__init__.py" in names
    for model in ("stdlib-moe", "stdlib-draft"):  # the built-in models ship as package data
        assert {f"expertmesh/builtin/{model}/{f}" for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                           "tokenizer_config.json")} <= set(names)


def test_public_api_is_exactly_all():
    public = {n for n in dir(expertmesh) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(expertmesh, n)).__name__ == "module"}
    assert public - modules == set(expertmesh.__all__) - {"__version__"}
    for name in expertmesh.__all__:
        assert hasattr(expertmesh, name)


def test_the_sdk_imports_from_the_folder_holding_the_clone(tmp_path):
    """`make install` installs a copy (an editable install is hidden by the
    clone's folder there); from that folder a script imports the installed SDK."""
    import site
    import textwrap

    install = [l for l in (REPO / "Makefile").read_text().splitlines() if "pip install" in l]
    assert install and not [l for l in install if " -e " in l]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel"), str(REPO)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    (packages,) = (tmp_path / "venv").glob("lib/python*/site-packages")
    (wheel,) = (tmp_path / "wheel").glob("expertmesh-*.whl")
    zipfile.ZipFile(wheel).extractall(packages)  # what pip install does for a pure-Python wheel
    (packages / "deps.pth").write_text("\n".join(site.getsitepackages()))  # mlx, grpc, ... from this environment
    parent = tmp_path / "home"
    parent.mkdir()
    (parent / "expertmesh").symlink_to(REPO, target_is_directory=True)  # the clone, under its own name
    (parent / "sdk.py").write_text(textwrap.dedent("""
        from expertmesh import Client
        import expertmesh.nodes
        print(Client.__module__, expertmesh.nodes.__name__)
    """))
    out = subprocess.run([str(tmp_path / "venv/bin/python"), "sdk.py"], cwd=parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["expertmesh.client", "expertmesh.nodes"]


def test_runtime_dependencies_are_what_the_runtime_imports():
    """Every third-party module the runtime imports is declared, and every declared
    dependency is imported (fixtures in expertmesh.testing and training aside)."""
    import ast
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: re.split(r"[\s\[<>=;!~]", req, maxsplit=1)[0].lower().replace("_", "-")
    declared = {name(r) for r in project["dependencies"]}
    extras = {name(r) for r in project["optional-dependencies"]["plot"]}
    imported = set()
    for folder in ("expertmesh", "nodes", "discovery"):
        for file in (REPO / folder).rglob("*.py"):
            if {"testing", "v1"} & set(file.relative_to(REPO).parts) or file.name == "train.py":
                continue
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    imported.add(node.module.split(".")[0])
    dists = importlib.metadata.packages_distributions()
    third = {m: {d.lower().replace("_", "-") for d in dists[m]} for m in imported - {"expertmesh"} if m in dists}
    assert {m for m, ds in third.items() if not ds & (declared | extras)} == set()  # used, not declared
    used = set().union(*third.values())
    assert declared - used == set()  # declared, not used
