"""The timm backbone: weights, data configuration, device and precision.

Weights policy: with ``pretrained: true`` the weights come from a local ``.safetensors`` file
(``weights_path``) or from the model's Hugging Face hub repository (its ``model.safetensors``). Either
loads for real or the run stops with BackboneError: never random weights in place of asked-for ones, and
never a pickle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.data import resolve_model_data_config

from .config import DataConfig
from .errors import BackboneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backbone:
    model: torch.nn.Module
    device: torch.device
    precision: str  # fp32, tf32, bf16, fp16
    data_config: dict[str, Any]
    output_size: int
    weights: str  # where the weights came from: "random (pretrained: false)", a file, or a hub id
    channels_last: bool = False

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels (any device) -> float32 embeddings on the device. The one forward path: the
        pipeline and the benchmarks' forward-only figures both run exactly this."""
        mean, std = self._norm
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = ((x - mean) / std).contiguous(memory_format=fmt)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(x).float()

    @property
    def _norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.__dict__.get("_norm_cache")
        if cached is None:
            cached = normalizer(self)
            object.__setattr__(self, "_norm_cache", cached)
        return cached


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BackboneError("data.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _hub_weights_file(model_name: str) -> str:
    """Download (or find in the local cache) the model's safetensors weights from the hub."""
    cfg = timm.get_pretrained_cfg(model_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise BackboneError(
            f"{model_name}: timm knows no hub weights for this model; set data.weights_path to a local "
            ".safetensors file, or pretrained: false for random weights"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(hub_id, "model.safetensors")
    except Exception as exc:
        raise BackboneError(
            f"{model_name}: could not fetch pretrained weights from the hub ({hub_id}): "
            f"{type(exc).__name__}: {exc}. The run stops rather than continue with random weights; "
            "check the network or set data.weights_path to a local .safetensors file"
        ) from None


def load(cfg: DataConfig) -> Backbone:
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    kwargs: dict[str, Any] = {"num_classes": 0}
    if cfg.image_size is not None:
        pcfg = timm.get_pretrained_cfg(cfg.feature_model)
        if pcfg is not None and getattr(pcfg, "fixed_input_size", False):
            kwargs["img_size"] = cfg.image_size  # ViTs: resample the position embeddings to this size
    if cfg.pretrained:
        weights = cfg.weights_path or _hub_weights_file(cfg.feature_model)
        kwargs["pretrained_cfg_overlay"] = {"file": weights, "source": "", "custom_load": False}
    else:
        weights = "random (pretrained: false)"
    # Random weights (pretrained: false) must be the same in every process of a run: a resumed run
    # continues with the model it started with.
    torch.manual_seed(cfg.seed)
    try:
        model = timm.create_model(cfg.feature_model, pretrained=cfg.pretrained, **kwargs)
    except BackboneError:
        raise
    except Exception as exc:
        raise BackboneError(
            f"{cfg.feature_model}: could not create the model with weights {weights}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    data_config = resolve_model_data_config(model)
    if cfg.image_size is not None:
        data_config["input_size"] = (3, cfg.image_size, cfg.image_size)
    model.eval().requires_grad_(False).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = True
    if cfg.compile:
        model = torch.compile(model)
    log.info(
        "backbone %s (%s weights) on %s, %s, input %s, %d features",
        cfg.feature_model,
        weights,
        device,
        precision,
        data_config["input_size"],
        model.num_features if hasattr(model, "num_features") else -1,
    )
    return Backbone(
        model=model,
        device=device,
        precision=precision,
        data_config=data_config,
        output_size=int(getattr(model, "num_features", 0) or _probe_width(model, data_config, device)),
        weights=weights,
        channels_last=cfg.channels_last,
    )


def _probe_width(model: torch.nn.Module, data_config: dict[str, Any], device: torch.device) -> int:
    with torch.inference_mode():
        return int(model(torch.zeros(1, *data_config["input_size"], device=device)).shape[-1])


def normalizer(backbone: Backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors on the device, scaled for uint8 input."""
    mean = torch.tensor(backbone.data_config["mean"], device=backbone.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(backbone.data_config["std"], device=backbone.device).view(1, 3, 1, 1) * 255.0
    return mean, std
