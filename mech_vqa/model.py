"""``VQAModel``: an unmodified HF vision-language model, its processor and its adapter, together.

    vqa = VQAModel.from_pretrained("llava-hf/llava-1.5-7b-hf", dtype=torch.float16)   # or a folder
    vqa = VQAModel.organism()                                   # the tiny model shipped in data/
    inp = vqa.prepare(image, "What is the color of the dog?")   # greedy answer, teacher-forced
    with vqa.trace(["z"], positions=[inp.target().position]) as cache:
        vqa.forward(inp)

``backend="nnsight"`` runs ``trace`` / ``forward`` through nnsight instead of plain hooks (see
:mod:`mech_vqa.backends`); methods built on them run unchanged on either.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .adapters import ModelAdapter, get_adapter
from .backends import Backend, make_backend
from .inputs import BatchedInput, PreparedInput, collate, prepare


class ModelLoadError(OSError):
    """A model cannot be loaded; the message names the problem and the fix."""


def _looks_local(name: str) -> bool:
    """A folder path rather than a hub id (``owner/name``): absolute, relative, home or several slashes."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).expanduser().exists())


def _check_source(name_or_path: str) -> str:
    """The local folder (resolved) or the hub id; a missing or incomplete folder is one clear error."""
    name = str(name_or_path)
    if not _looks_local(name):
        return name
    folder = Path(name).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; give a folder written by save_pretrained "
                             "(config.json, weights, processor files) or a hub id such as "
                             "llava-hf/llava-1.5-7b-hf")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file, not a model folder; give the folder that holds config.json "
                             "and the weights")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json; give the folder written by "
                             "save_pretrained (config.json, weights, processor files)")
    return str(folder)


def _load_error(source: str, err: Exception) -> ModelLoadError:
    """One clear error for a checkpoint that does not read (truncated, corrupt or incomplete)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if type(err).__name__ == "SafetensorError" or "deserializ" in text or "header" in text.lower():
        return ModelLoadError(f"the weights in {source} cannot be read ({text}): the file is truncated or "
                              "corrupt; copy or download the checkpoint again")
    return ModelLoadError(f"{source} cannot be loaded as a LLaVA-family model ({type(err).__name__}: {text}); "
                          "check that it is a complete checkpoint folder or hub id of a supported model")


class VQAModel:
    """A HF LLaVA-family model with its processor and adapter. The model is never modified.

    ``backend``: ``"hooks"`` (default, plain PyTorch hooks in this process) or ``"nnsight"``
    (nnsight 0.8; ``remote="local"`` runs each forward through nnsight's offline simulation of a
    remote call). Methods that cannot run on the chosen backend raise
    :class:`~mech_vqa.backends.BackendNotSupported`.
    """

    def __init__(self, model: nn.Module, processor, name: str | None = None, *, backend: str | Backend = "hooks",
                 remote: bool | str = False):
        self.model = model
        self.processor = processor
        self.adapter: ModelAdapter = get_adapter(model)
        self.adapter.bind_processor(processor)  # marker tokens some geometries read (Idefics3's tile markers)
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.backend: Backend = make_backend(backend, self, **({"remote": remote} if remote else {}))

    # ----------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, attn_implementation: str | None = None,
                        backend: str = "hooks", remote: bool | str = False, **kwargs) -> VQAModel:
        """Load a model and processor by hub id or local folder (``from_pretrained`` of both).

        A missing folder, a folder without ``config.json`` and weights that do not read (a truncated
        or corrupt file) are one :class:`ModelLoadError` each, naming the problem and the fix.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        source = _check_source(name_or_path)
        model_kwargs = dict(kwargs)
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        try:
            if remote is True:
                # NDIF holds the weights: the client builds the architecture only, on the meta device
                from transformers import AutoConfig

                with torch.device("meta"):
                    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source),
                                                                    **({"dtype": dtype} if dtype is not None else {}))
                model.config._name_or_path = str(name_or_path)
            else:
                model = AutoModelForImageTextToText.from_pretrained(source, **model_kwargs)
            try:
                processor = AutoProcessor.from_pretrained(source)
            except (OSError, ImportError) as err:
                # Qwen-VL processors insist on a video processor, and transformers' PixtralProcessor (Mistral-3)
                # is marked as needing torchvision; images need neither
                from .build import image_only_processor

                wants_torchvision = "video processor" in str(err) or "Torchvision" in str(err)
                if not wants_torchvision or (processor := image_only_processor(source)) is None:
                    raise
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            if type(err).__name__ == "AdapterError" or isinstance(err, ModelLoadError):
                raise
            raise _load_error(source, err) from err
        except Exception as err:  # safetensors' SafetensorError derives from Exception only
            if type(err).__name__ != "SafetensorError":
                raise
            raise _load_error(source, err) from err
        if device is not None:
            model = model.to(device)
        return cls(model.eval(), processor, name=str(name_or_path), backend=backend, remote=remote)

    @classmethod
    def organism(cls, variant: str = "scaffolded", **kwargs) -> VQAModel:
        """A model organism shipped in ``data/`` (see :mod:`mech_vqa.organism`).

        ``"scaffolded"`` (default, ``data/organism``): trained with an attention scaffold on text
        layer 2, head 0; ``"free"`` (``data/organism_free``): the control, trained without one.
        """
        from .organism import organism_dir

        return cls.from_pretrained(str(organism_dir(variant)), **kwargs)

    # ------------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        device = self.adapter.device
        # a weightless (meta) client of a remote backend sends its inputs from the CPU
        return torch.device("cpu") if device.type == "meta" else device

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def prepare(self, image, question: str, answer: str | None = None, *, generate: bool = True,
                max_new_tokens: int = 16) -> PreparedInput:
        """Inputs for ``(image, question)``; with no ``answer``, a greedy one is generated and forced."""
        if answer is None and generate:
            answer = self.generate(image, question, max_new_tokens=max_new_tokens)
            if not answer.strip():
                return prepare(self.processor, self.adapter, image, question, None)
        return prepare(self.processor, self.adapter, image, question, answer)

    @torch.no_grad()
    def generate(self, image, question: str, max_new_tokens: int = 16) -> str:
        """Greedy answer text (no sampling)."""
        inp = prepare(self.processor, self.adapter, image, question, None)
        out = self.backend.generate(self.adapter.model_inputs(inp.model_inputs(self.device, self.adapter.vision_dtype())),
                                    max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, inp.seq_len:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    # ----------------------------------------------------------------------- running
    def batch(self, items: list[PreparedInput]) -> BatchedInput:
        """Left-pad several prepared inputs into one batch."""
        pad = self.tokenizer.pad_token_id
        return collate(items, pad if pad is not None else 0)

    def forward(self, inp: PreparedInput | BatchedInput | dict, **kwargs):
        """The HF forward on prepared inputs (``use_cache=False``); returns the HF output."""
        if isinstance(inp, (PreparedInput, BatchedInput)):
            inputs = inp.model_inputs(self.device, self.adapter.vision_dtype())
        else:
            inputs = inp
        return self.backend.forward(self.adapter.model_inputs(inputs), use_cache=False, **kwargs)

    @torch.no_grad()
    def logits(self, inp: PreparedInput | BatchedInput | dict) -> torch.Tensor:
        return self.forward(inp).logits

    def trace(self, names: Sequence[str] = (), **kwargs):
        """:func:`mech_vqa.capture.trace` on this model (context manager), run by the backend."""
        return self.backend.trace(names, **kwargs)

    def keep_hooks(self):
        """A block inside which captures keep their hooks between calls (hooks backend): a loop of
        ``explain`` / ``compare`` calls pays each capture's set-up once. Removed when the block ends::

            with vqa.keep_hooks():
                explanations = [explain(vqa, inp) for inp in inputs]
        """
        return self.backend.keep_hooks()

    def to_str_tokens(self, ids) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens([int(i) for i in torch.as_tensor(ids).flatten()])

    def __repr__(self) -> str:
        a = self.adapter
        return (f"VQAModel({self.name!r}, {type(self.model).__name__}, layers={a.n_layers}, heads={a.n_heads}, "
                f"kv_heads={a.n_kv_heads}, d_model={a.d_model}, grid={a.patch_grid or 'per image'})")
