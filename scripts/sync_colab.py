"""Write the book's repository URL (`repository.url` in _config.yml, its one home) into every chapter's Colab
install cell. Run it after changing that line: `python scripts/sync_colab.py`. A test checks they agree."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REPO_LINE = re.compile(r'^REPO = ".*"$', re.M)


def repository_url() -> str:
    return yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]


def install_cell(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code" and "google.colab" in "".join(c["source"]))


def sync(path: Path, url: str) -> bool:
    """Set the notebook's REPO line to `url`; True when the file changed."""
    nb = json.loads(path.read_text())
    cell = install_cell(nb)
    old = "".join(cell["source"])
    new = REPO_LINE.sub(f'REPO = "{url}"', old)
    if new == old:
        return False
    cell["source"] = new.splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


if __name__ == "__main__":
    url = repository_url()
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        print(f"{notebook.name}: {'updated' if sync(notebook, url) else 'already'} {url}")
