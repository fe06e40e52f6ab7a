"""Processors that work without torchvision.

Qwen-VL's, SmolVLM's and LLaVA-OneVision's processors hold a video processor, and transformers builds video
processors only with torchvision. Where torchvision cannot be installed (a CPU machine whose registry has only a
CUDA build), `AutoProcessor` then fails for those families although the chapters never pass a video. There,
`load_processor` builds the family's own processor class without its video part (`image_only`): the same image
processor (its `*ImageProcessorPil` fallback), tokenizer, chat template and token expansion. With torchvision
(Colab), `AutoProcessor` loads the real one and nothing here runs.
"""
from __future__ import annotations

import functools
import importlib.util
import inspect


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class NoVideoProcessor:
    """Stands where the video processor would, for code that reads its defaults (SmolVLM's chat template reads
    `num_frames` and `fps`): both None, and nothing else."""

    num_frames = fps = None

    def __call__(self, *args, **kwargs):
        raise RuntimeError("no video processor here (it needs torchvision): this processor handles images "
                           "only; install torchvision for videos")


@functools.cache
def image_only(processor_class: type) -> type:
    """A subclass of `processor_class` whose only parts are its image processor and tokenizer.

    Its `__init__` runs the family's own with `video_processor=None`: `ProcessorMixin` takes the parts named in
    the subclass's signature (image processor, tokenizer) and never looks the video class up. Saved with
    `save_pretrained`, it writes the family's class name, so a machine with torchvision loads the full one.
    """
    signature = inspect.signature(processor_class.__init__)
    if "video_processor" not in signature.parameters:
        return processor_class

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                 chat_template=chat_template, **kwargs)
        self.video_processor = NoVideoProcessor()  # read for defaults by SmolVLM's apply_chat_template

    # `ProcessorMixin` takes its parts from this signature: the family's own, but the video processor
    __init__.__signature__ = signature.replace(parameters=[p for name, p in signature.parameters.items()
                                                           if name != "video_processor"])
    settings = [name for name in signature.parameters if name not in ("self", "image_processor", "tokenizer",
                                                                       "video_processor", "kwargs")]

    # `from_pretrained` must pass the saved settings the family's __init__ names (SmolVLM's image_seq_len,
    # OneVision's num_image_tokens), which transformers finds in the code object of __init__, here **kwargs; it
    # builds the processor with `from_args_and_dict` (transformers 5.24) or `from_dict` (5.25), so both pass them
    @classmethod
    def from_args_and_dict(cls, args, processor_dict, **kwargs):
        given = {**processor_dict, **kwargs}
        return cls(*args, **{name: given[name] for name in settings if name in given})

    @classmethod
    def from_dict(cls, processor_dict, **kwargs):
        given = {**processor_dict, **kwargs}
        return cls(given["image_processor"], given["tokenizer"],
                   **{name: given[name] for name in settings if name in given})

    return type(processor_class.__name__, (processor_class,),
                {"__init__": __init__, "from_args_and_dict": from_args_and_dict, "from_dict": from_dict,
                 "__module__": processor_class.__module__,
                 "__doc__": f"{processor_class.__name__} without its video processor (no torchvision here)."})


def load_processor(path: str):
    """The checkpoint's processor: `AutoProcessor`'s, or without torchvision the family's image-only one."""
    from transformers import AutoProcessor
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, AttributeError, ImportError) as err:
        if has_torchvision():
            raise
        import transformers
        from transformers.processing_utils import ProcessorMixin
        name = ProcessorMixin.get_processor_dict(path)[0].get("processor_class")
        if not name or not hasattr(transformers, name):
            raise ValueError(f"cannot build the processor of {path!r} without torchvision ({err}); "
                             "install torchvision, or load a checkpoint whose processor needs no video part") from err
        return image_only(getattr(transformers, name)).from_pretrained(path)
