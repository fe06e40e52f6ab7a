"""Where files live and how they are written: package data, the cache, atomic writes, cached artefacts.

Three rules hold for every file the package writes:
- it appears whole or not at all (written under a temporary name next to its target, then renamed);
- a derived artefact (mean visual token, concept statistics, assembled checkpoint, contextual index) is cached
  under a key that names everything it was computed from, so a change of model or data cannot reuse a stale one;
- nothing is stored as a pickle: tensors go to safetensors, tables to parquet, metadata to JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def data_path(*parts: str) -> Path:
    """A file or folder of the package's shipped data (shapes-llava weights, the corpus, the judge).

    An installed wheel carries the data inside the package (`vlminterp_utils/data`); a source checkout, also when
    installed in editable mode, keeps it in the repository's top-level `data/` folder. Both are found here, and
    only here.
    """
    packaged = resources.files("vlminterp_utils").joinpath("data", *parts)
    if packaged.is_file() or packaged.is_dir():
        return Path(str(packaged))
    return REPO_DATA.joinpath(*parts)


def cache_dir() -> Path:
    """`$VLMINTERP_CACHE`, default `~/.cache/vlminterp`: downloaded weights and derived artefacts."""
    path = Path(os.environ.get("VLMINTERP_CACHE", Path.home() / ".cache" / "vlminterp")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_path(target: str | Path, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `target` to write a file (or, with `folder`, a folder) into; on success it
    replaces `target` in one rename, on failure it is removed and `target` is left as it was.

    `keep_existing` (folders): when `target` appeared meanwhile, keep it and drop ours. For a cached artefact another
    process built under the same key: it is the same artefact, and that process may be reading it right now."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    else:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.partial-")
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not folder:  # mkstemp made it private (0600), and some writers re-create it so: the usual mode
            os.chmod(tmp, 0o666 & ~_umask())
        if folder and target.exists():
            if keep_existing:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # a folder that appeared since the check above (not empty: no rename onto it)
            if not (folder and keep_existing and target.exists()):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2))


def cache_key(*parts) -> str:
    """A short hash of everything an artefact was computed from (JSON-serialisable parts)."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]


def weights_fingerprint(module, samples: int = 256) -> str:
    """A short hash of a module's weights, for cache keys: every parameter's name and shape and `samples` evenly
    spaced values of it. Two models that share an LLM (shapes-llava and its frozen-LLM twin) share what is computed
    from that LLM alone; a LoRA update, which moves every value of a weight, changes the hash."""
    import torch
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in module.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(flat[::step].to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:20]


def cached_artefact(kind: str, key: str, build: Callable[[], T], save: Callable[[T, Path], None],
                    load: Callable[[Path], T], folder: bool = False, suffix: str = "", cache: bool = True) -> T:
    """Load the artefact `kind/key` from the cache, or build it, save it atomically and return it.

    `save(obj, path)` writes to the path it is given (a folder if `folder`); `load(path)` reads it back.
    """
    path = cache_dir() / kind / (key + suffix)
    if cache and path.exists():
        return load(path)
    obj = build()
    if cache:  # a folder another process built meanwhile is the same artefact: kept as it is
        with atomic_path(path, folder=folder, keep_existing=True) as tmp:
            save(obj, tmp)
    return obj


def cached_tensors(kind: str, key: str, build: Callable[[], dict], cache: bool = True) -> dict:
    """`cached_artefact` for a dict of tensors, stored as safetensors."""
    from safetensors.torch import load_file, save_file
    return cached_artefact(kind, key, build, lambda d, p: save_file({k: v.contiguous() for k, v in d.items()},
                                                                    str(p)),
                           lambda p: load_file(str(p)), suffix=".safetensors", cache=cache)


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
