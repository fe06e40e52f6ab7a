"""The offline weight fetcher: verification and clear errors."""
import pytest

from vlminterp_utils import weights


def test_offline_and_not_cached_says_how_to_get_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m vlminterp_utils.core.weights"):
        weights.smollm2_gguf(download=False)


def test_a_corrupt_cached_file_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMINTERP_CACHE", str(tmp_path))
    bad = tmp_path / "smollm2" / weights.SMOLLM2_GGUF
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a model")
    with pytest.raises(FileNotFoundError):
        weights.smollm2_gguf(download=False)


def test_cached_weights_verify(tmp_path):
    path = weights.smollm2_gguf()  # the Makefile fetched it once
    assert path.stat().st_size > 90e6
    assert weights.sha256_of(path) == weights.SMOLLM2_SHA256
