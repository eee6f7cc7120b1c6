"""Building and loading the families' real Processor classes, with or without torchvision.

transformers 5 makes a video processor a required part of the Qwen2-VL, Qwen2.5-VL,
LLaVA-OneVision and InternVL processors, and every video processor needs torchvision. Our CPU
machines have no usable torchvision (PyPI's build does not load beside the CPU torch), so
``AutoProcessor.from_pretrained`` cannot build those processors there, for any checkpoint.
Calibration only needs images, so when torchvision is missing we build the *same* Processor class
with ``video_processor=None`` through a subclass that only relaxes that one argument check (it keeps
the class name, so what it saves loads with ``AutoProcessor`` where torchvision exists).
``load_processor`` is the one entry point the pipeline should use.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import transformers
from transformers import ProcessorMixin

from ..errors import VlmqError


@functools.cache
def torchvision_available() -> bool:
    try:
        from transformers.utils import is_torchvision_available

        return bool(is_torchvision_available())
    except ImportError:  # pragma: no cover - older layouts
        return False


def needs_video_processor(processor_cls: type) -> bool:
    return "video_processor" in inspect.signature(processor_cls.__init__).parameters


class _AbsentVideoProcessor:
    """Stands in for the missing video processor while ``save_pretrained`` walks the attributes."""

    _auto_class = None


@functools.cache
def _imageonly_class(processor_cls: type) -> type:
    """``processor_cls`` with the video-processor argument optional (same name and module)."""

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return processor_cls.check_argument_for_proper_class(self, argument_name, argument)

    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        absent = self.video_processor is None
        if absent:
            self.video_processor = _AbsentVideoProcessor()
        try:
            return processor_cls.save_pretrained(self, save_directory, *args, **kwargs)
        finally:
            if absent:
                self.video_processor = None

    def to_dict(self: Any) -> dict[str, Any]:
        out = processor_cls.to_dict(self)
        if not isinstance(out.get("video_processor"), dict):
            out.pop("video_processor", None)
        return out

    return type(
        processor_cls.__name__,
        (processor_cls,),
        {
            "__module__": processor_cls.__module__,
            "__doc__": f"{processor_cls.__name__} without a video processor (no torchvision here).",
            "check_argument_for_proper_class": check_argument_for_proper_class,
            "save_pretrained": save_pretrained,
            "to_dict": to_dict,
        },
    )


def make_processor(processor_cls: type, video_processor: Any = None, **kwargs: Any) -> ProcessorMixin:
    """Instantiate a family's Processor; without a video processor where the class wants one."""
    if needs_video_processor(processor_cls):
        if video_processor is None:
            return _imageonly_class(processor_cls)(video_processor=None, **kwargs)
        return processor_cls(video_processor=video_processor, **kwargs)
    return processor_cls(**kwargs)


def _pil_image_processor(p: Path, proc_dict: dict[str, Any]) -> Any:
    """The PIL-backend image processor named in the processor config (no torchvision needed)."""
    sub = proc_dict.get("image_processor") or {}
    name = str(sub.get("image_processor_type", ""))
    base = name[: -len("Pil")] if name.endswith("Pil") else name
    cls = getattr(transformers, base + "Pil", None)
    if cls is None:
        raise VlmqError(f"{p}: image processor {name!r} has no PIL backend in transformers "
                        f"{transformers.__version__}, and torchvision is not installed",
                        "install torchvision matching your torch, or use a supported model")
    return cls.from_pretrained(str(p), local_files_only=True)


def load_processor(path: str | Path) -> ProcessorMixin:
    """The model's processor from a local folder, offline; works without torchvision too."""
    p = Path(path)
    cfg_file = p / "processor_config.json"
    if not p.is_dir():
        raise VlmqError(f"model path {p} does not exist", "pass a model folder with processor files")
    if torchvision_available() or not cfg_file.is_file():
        try:
            return transformers.AutoProcessor.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise VlmqError(
                f"cannot load the processor of {p}: {e}",
                "the folder needs the processor/tokenizer files of the original checkpoint "
                "(processor_config.json or preprocessor_config.json, tokenizer files, chat template)",
            ) from None
    proc_dict = json.loads(cfg_file.read_text())
    name = proc_dict.get("processor_class")
    processor_cls = getattr(transformers, str(name), None)
    if processor_cls is None or not needs_video_processor(processor_cls):
        return transformers.AutoProcessor.from_pretrained(str(p), local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    image_processor = _pil_image_processor(p, proc_dict)
    init_params = inspect.signature(processor_cls.__init__).parameters
    skip = {"self", "image_processor", "tokenizer", "video_processor", "chat_template"}
    kwargs = {k: v for k, v in proc_dict.items() if k in init_params and k not in skip}
    template = p / "chat_template.jinja"
    if template.is_file():
        kwargs["chat_template"] = template.read_text()
    elif isinstance(proc_dict.get("chat_template"), str):
        kwargs["chat_template"] = proc_dict["chat_template"]
    return make_processor(processor_cls, image_processor=image_processor, tokenizer=tokenizer, **kwargs)
