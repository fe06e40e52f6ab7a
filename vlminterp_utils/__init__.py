"""vlminterp_utils: the engine of the executable book "How vision-language models see".

Three layers (README, "Architecture"):
- `core`: loading a VLM and its adapter (`models`), the shapes world (`shapes`), reading the model (`readout`),
  statistics (`stats`), files and caches (`storage`), the offline SmolLM2 weights (`weights`);
- `chapters`: ch. 1 `interventions` + `localization`, ch. 2 `lenses` + `latentlens` + their positive controls
  `probe`, ch. 3 `inversion` + its judge
  `classifier`, models side by side `comparison`, and `plotting` + `report` + `seminar` (timings, exercise
  checks) + `buildit` (exercises where the reader writes a mechanism, and the student editions) for all of them;
- `workshop`: training and evaluating the embedded model, training the judge, generating the corpus.

The modules a reader uses are importable from the top, `from vlminterp_utils import load_vlm, shapes`; each is
imported on first use, so that `import vlminterp_utils` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

MODULES = {
    "models": "core.models", "shapes": "core.shapes", "readout": "core.readout", "stats": "core.stats",
    "storage": "core.storage", "weights": "core.weights", "geometry": "core.geometry", "photos": "core.photos",
    "interventions": "chapters.interventions", "localization": "chapters.localization", "lenses": "chapters.lenses",
    "latentlens": "chapters.latentlens", "inversion": "chapters.inversion", "classifier": "chapters.classifier",
    "plotting": "chapters.plotting", "report": "chapters.report", "seminar": "chapters.seminar",
    "comparison": "chapters.comparison", "probe": "chapters.probe", "buildit": "chapters.buildit",
}
FUNCTIONS = {"load_vlm": "models", "adapter_for": "models", "VLMAdapter": "models"}
__all__ = sorted(MODULES) + sorted(FUNCTIONS)


def __getattr__(name: str):
    if name in MODULES:
        module = importlib.import_module(f".{MODULES[name]}", __name__)
        globals()[name] = module
        return module
    if name in FUNCTIONS:
        return getattr(__getattr__(FUNCTIONS[name]), name)
    raise AttributeError(f"module 'vlminterp_utils' has no attribute {name!r}")


def __dir__():
    return __all__
