"""The package as a user meets it: the README's code runs, the layers keep their direction, a wheel carries the
data and finds it when installed elsewhere."""
import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import vlminterp_utils

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vlminterp_utils"
SHIPPED = ["shapes_llava/vision_projector.safetensors", "shapes_llava/vision_projector.json",
           "shapes_llava/MODEL_CARD.md", "corpus/default_corpus.txt", "classifier/classifier.safetensors",
           "classifier/classifier.json"]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_code_blocks_run(capsys):
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README is ours
    out = capsys.readouterr().out
    assert "truth:" in out and "about:" in out


def test_the_public_api_is_importable_from_the_top():
    from vlminterp_utils import VLMAdapter, load_vlm, shapes  # noqa: F401
    for name in vlminterp_utils.__all__:
        assert getattr(vlminterp_utils, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlminterp_utils.nope  # noqa: B018


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the package modules a file imports (relative imports resolved)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level] if node.level else ()
            module = ".".join(base + ((node.module,) if node.module else ()))
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


@pytest.mark.parametrize("layer", ["core", "chapters"])
def test_no_chapter_or_core_module_imports_the_workshop(layer):
    for path in (PACKAGE / layer).rglob("*.py"):
        workshop = [m for m in imported_modules(path) if m.startswith("vlminterp_utils.workshop")]
        assert not workshop, f"{path.name} imports {workshop}"


def test_core_does_not_import_the_chapters():
    for path in (PACKAGE / "core").rglob("*.py"):
        chapters = [m for m in imported_modules(path) if m.startswith("vlminterp_utils.chapters")]
        assert not chapters, f"{path.name} imports {chapters}"


def test_the_import_rule_catches_a_workshop_import(tmp_path):
    """The check above can fail: a chapter module that imports the trainer is caught."""
    bad = PACKAGE / "chapters" / "_probe_bad_import.py"
    bad.write_text("from ..workshop.train import answer_loss\n")
    try:
        assert "vlminterp_utils.workshop.train" in imported_modules(bad)
    finally:
        bad.unlink()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "repo"
    # from a clean copy: setuptools builds in the source tree, and a stale build/ there could slip into the wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", "_build", "build", ".git", "*.egg-info",
                                                                "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(out), str(source)], check=True, capture_output=True)
    (found,) = out.glob("vlminterp_utils-*.whl")
    return found


def test_a_wheel_built_from_the_repo_holds_the_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for item in SHIPPED:
        assert f"vlminterp_utils/data/{item}" in names, item
    assert not any(n.startswith(("tests/", "notebooks/", "vlminterp_utils/data/.")) for n in names)


def test_an_installed_wheel_finds_its_data_from_another_directory(wheel, tmp_path):
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import vlminterp_utils; from vlminterp_utils import latentlens, storage; "
             "print(vlminterp_utils.__file__); print(storage.data_path('shapes_llava', "
             "'vision_projector.safetensors')); print(len(latentlens.load_corpus()))")
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert Path(out[1]).exists() and int(out[2]) > 1000


@pytest.mark.slow
def test_a_wheel_in_a_clean_virtual_environment_runs_chapter_0(wheel, tmp_path):
    """As a reader installs it: a fresh venv, the CPU torch, the wheel with its dependencies; then chapter 0 in
    smoke mode, run from a directory outside the repository (minutes: pip resolves the dependencies)."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q"]
    subprocess.run(pip + ["torch==2.13.0"], check=True, env=env)  # the CPU build; an unpinned torch pulls CUDA
    subprocess.run(pip + [str(wheel), "papermill", "ipykernel"], check=True, env=env)
    notebook = ROOT / "notebooks" / "00_anatomy_of_a_vlm.ipynb"
    run = subprocess.run([python, "-m", "papermill", str(notebook), "out.ipynb", "-p", "smoke", "True"],
                         cwd=elsewhere, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "vision tower" in (elsewhere / "out.ipynb").read_text()


def test_the_publishing_workflow_builds_the_whole_book_with_cpu_torch_and_deploys_its_html():
    import yaml
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    runs = [s["run"] for s in steps if "run" in s]
    assert any(r.startswith("make book") and "TORCH_PIP_ARGS=" in r and "whl/cpu" in r for r in runs), runs
    assert any(s.get("with", {}).get("path") == "_build/html" for s in steps if "upload-pages" in s.get("uses", ""))
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0 $(TORCH_PIP_ARGS)" in makefile  # the workflow's pip arguments reach the torch install
    # chapter 3 in full alone took 57 minutes on 2 cores (benchmarks/README.md): the job must outlast the book
    assert workflow["jobs"]["build"]["timeout-minutes"] >= 120
