"""The timm backbone, loaded as preflight.py resolved it: weights, device, precision, input.

Weights policy: with ``pretrained: true`` the weights come from a local ``.safetensors`` file
(``weights_path``) or the model's hub repository (its ``model.safetensors``, fetched or found in the cache
by the preflight). Either loads for real or the run stops with BackboneError: never random weights in place
of asked-for ones, and never a pickle. ``pretrained: false`` gives random weights from a fixed seed, the
same in every process of every run (so they can share embeddings).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import timm
import torch

from building_image_triplet_model.config import DataConfig
from building_image_triplet_model.engine import machine
from building_image_triplet_model.engine.identity import ModelIdentity
from building_image_triplet_model.engine.preflight import Resolved, model_kwargs
from building_image_triplet_model.errors import BackboneError

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_SEED = 0


@dataclass
class Backbone:
    model: torch.nn.Module
    device: torch.device
    identity: ModelIdentity
    output_size: int
    channels_last: bool = False
    # torch.set_num_threads is per calling thread (OpenMP), and the model is loaded in another thread than
    # the one that runs it: embed() applies the count in the thread it runs in.
    cpu_threads: int | None = None
    _norm: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.identity.precision)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC pixels (any device) -> float32 embeddings on the device. The one forward path: the
        pipeline and the benchmarks' forward-only figures both run exactly this."""
        if self.cpu_threads is not None and torch.get_num_threads() != self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)
        if self._norm is None:
            scale = 255.0
            mean = torch.tensor(self.identity.mean, device=self.device).view(1, 3, 1, 1) * scale
            std = torch.tensor(self.identity.std, device=self.device).view(1, 3, 1, 1) * scale
            self._norm = (mean, std)
        mean, std = self._norm
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = ((x - mean) / std).contiguous(memory_format=fmt)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.model(x).float()


def load(cfg: DataConfig, resolved: Resolved) -> Backbone:
    device = torch.device(resolved.device)
    precision = resolved.precision
    threads = machine.model_threads(cfg, device.type) if device.type == "cpu" else None
    if threads is not None:
        torch.set_num_threads(threads)
    kwargs = model_kwargs(cfg)
    if resolved.weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": resolved.weights_file, "source": "", "custom_load": False}
    torch.manual_seed(RANDOM_WEIGHTS_SEED)
    try:
        model = timm.create_model(cfg.feature_model, pretrained=resolved.weights_file is not None, **kwargs)
    except Exception as exc:
        raise BackboneError(
            f"{cfg.feature_model}: could not create the model with weights "
            f"{resolved.weights_file or 'random (pretrained: false)'}: {type(exc).__name__}: {exc}"
        ) from None
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
        "backbone %s (%s) on %s, %s, input %s, %d features",
        cfg.feature_model,
        resolved.weights_file or "random weights, pretrained: false",
        device,
        precision,
        list(resolved.identity.input_size),
        resolved.output_size,
    )
    return Backbone(model, device, resolved.identity, resolved.output_size, cfg.channels_last, threads)
