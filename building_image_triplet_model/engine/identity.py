"""Identity: what determines each thing a run keeps, as short digests ("keys").

* an archive's **content key**: its good image/metadata pairs, in index order, by stem, size and checksum
  (index.py computes it): the rows an embedding store holds;
* the **model key**: everything that decides an image's embedding (ModelIdentity): model, weights digest,
  input size and transform, precision, device type, stored dtype. Selection, splits, seed, KNN settings
  and the other archives are not part of it, so changing them never embeds an image again;
* the **plan key**: the selection and split settings over the run's inputs (archives and content keys);
* the **KNN key**: the plan key and k;
* the **run key**: plan, KNN and model key together: the artifact's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

from building_image_triplet_model.config import DataConfig

SELECTION_KEYS = ("n_samples", "n_images", "val_size", "test_size", "seed", "split_strategy")


def fingerprint(obj: Any) -> str:
    """A stable short digest of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def selection(cfg: DataConfig) -> dict[str, Any]:
    out = {k: getattr(cfg, k) for k in SELECTION_KEYS}
    if cfg.split_strategy == "cell":
        out["split_cell_m"] = cfg.split_cell_m
    return out


def inputs_key(contents: list[tuple[str, str]]) -> str:
    """The run's inputs: (source name, content key) of every archive, in order."""
    return fingerprint([list(c) for c in contents])


def plan_key(cfg: DataConfig, inputs: str) -> str:
    return fingerprint({"selection": selection(cfg), "inputs": inputs})


def knn_key(plan: str, k: int) -> str:
    return fingerprint({"plan": plan, "knn_k": k})


def run_key(plan: str, knn: str, model: str) -> str:
    return fingerprint({"plan": plan, "knn": knn, "model": model})


@dataclass(frozen=True)
class ModelIdentity:
    """What decides an embedding. Built by preflight.py once the device and the model's data
    configuration are known; recorded in emb/<key>/model.json."""

    model: str
    weights: str  # "sha256:<hex>" of the weights file, or "random" for pretrained: false (backbone.py)
    input_size: tuple[int, int, int]
    interpolation: str
    crop_pct: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fast_decode: bool
    precision: str  # resolved: fp32, tf32, bf16, fp16
    device_type: str  # resolved: cpu, cuda
    embedding_dtype: str

    @property
    def key(self) -> str:
        return fingerprint(self.as_dict())

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        return cls(
            **{**d, "input_size": tuple(d["input_size"]), "mean": tuple(d["mean"]), "std": tuple(d["std"])}
        )


def model_spec(cfg: DataConfig) -> dict[str, Any]:
    """The model settings as written in the config (before the device and precision are resolved): the
    status report, which imports no torch, finds a model key recorded for the same spec."""
    weights: Any = None
    if cfg.weights_path:
        st = os.stat(cfg.weights_path) if os.path.exists(cfg.weights_path) else None
        weights = [cfg.weights_path, st.st_size if st else None, st.st_mtime_ns if st else None]
    return {
        "model": cfg.feature_model,
        "image_size": cfg.image_size,
        "pretrained": cfg.pretrained,
        "weights_path": weights,
        "device": cfg.device,
        "precision": cfg.precision,
        "fast_decode": cfg.fast_decode,
        "embedding_dtype": cfg.embedding_dtype,
    }


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
