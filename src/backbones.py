"""Frozen timm backbones: any timm name, hub weights from the local cache, or a weights file.

A backbone is used for feature extraction only: `num_classes=0` gives the pooled
pre-logits features, as in the paper. Its eval transform is timm's own
(`resolve_model_data_config`), optionally at another image size.
"""
from __future__ import annotations

import difflib
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from src.cli import UserError, brief_reason
from src.io import file_fingerprint


@dataclass
class Backbone:
    model: nn.Module  # eval mode, pooled features of size `num_features`
    data_config: dict  # timm data config: input_size, interpolation, mean, std, crop_pct, crop_mode
    weights: dict  # where the weights came from, for the metadata

    @property
    def num_features(self) -> int:
        return self.model.num_features


def check_backbone_name(name: str) -> None:
    """Unknown timm names are a user error, with the closest known names as a hint."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown --backbone {name!r}{hint}")


def create_backbone(name: str, weights: Path | None = None, img_size: int | None = None,
                    pretrained: bool = True) -> Backbone:
    """Build a frozen backbone.

    weights: a .safetensors or .pth state dict (wins over `pretrained`); without it the
    timm pretrained weights are loaded from the Hugging Face cache (or the hub when online).
    img_size: run at this size instead of the model's configured one (position embeddings
    are resampled by timm).
    """
    check_backbone_name(name)
    size_kwargs = {"img_size": img_size} if img_size else {}
    if weights is not None:
        weights = Path(weights)
        model = _create(name, pretrained=False, **size_kwargs)
        _load_weights_file(model, weights, name)
        source = {"kind": "file", "path": str(weights), "sha256": file_fingerprint(weights),
                  "description": _describe_weights_file(weights)}
    elif pretrained:
        _ensure_pretrained_available(name)
        model = _create(name, pretrained=True, **size_kwargs)
        source = {"kind": "timm-pretrained", "hub_id": model.pretrained_cfg.get("hf_hub_id"),
                  "tag": model.pretrained_cfg.get("tag")}
    else:
        model = _create(name, pretrained=False, **size_kwargs)
        source = {"kind": "random-init", "description": "randomly initialised (no pretrained weights)"}
    model.eval().requires_grad_(False)
    data_config = timm.data.resolve_model_data_config(model)
    if img_size:
        data_config["input_size"] = (data_config["input_size"][0], img_size, img_size)
    return Backbone(model=model, data_config=data_config, weights=source)


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as err:  # e.g. img_size on a model without a fixed input size
        raise UserError(f"--backbone {name} does not accept these options ({err}); drop --img_size") from err


def _ensure_pretrained_available(name: str) -> None:
    """Fail fast, with instructions, when the weights are neither cached nor downloadable.

    Without this check huggingface_hub retries for about a minute before failing offline.
    """
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    hub_id = pretrained_cfg.hf_hub_id if pretrained_cfg is not None else None
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub_id, filename), str):
                return
    try:
        socket.getaddrinfo("huggingface.co", 443)
        return  # online: let timm download
    except OSError:
        pass
    raise UserError(
        f"no cached pretrained weights for --backbone {name} and no network: on a machine with internet run "
        f"`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`, then copy "
        f"~/.cache/huggingface/hub/models--{(hub_id or 'timm/' + name).replace('/', '--')} into this machine's "
        "~/.cache/huggingface/hub/ (or pass --weights FILE with a saved state dict)")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"--weights {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: truncated, wrong format, pickled code
        raise UserError(f"cannot read --weights {path} ({brief_reason(err)}); "
                        "give a .safetensors or .pth state dict") from err
    for key in ("state_dict", "model", "module"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"--weights {path} is not a state dict of tensors")
    return state


def _load_weights_file(model: nn.Module, path: Path, name: str) -> None:
    state = _read_state_dict(path)
    classifier = model.pretrained_cfg.get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(f"{classifier}.")}  # features only
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:  # timm's own adaptation, e.g. resampling position embeddings
        try:
            state = filter_fn(state, model)
        except Exception as err:
            raise UserError(f"--weights {path} does not fit --backbone {name} ({brief_reason(err)})") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        missing = set(model.state_dict()) - set(state)
        unexpected = set(state) - set(model.state_dict())
        detail = f"{len(missing)} missing and {len(unexpected)} unexpected tensors"
        if not missing and not unexpected:
            detail = "tensor shapes differ"
        raise UserError(f"--weights {path} does not fit --backbone {name} ({detail}); "
                        "use the architecture the weights were saved from") from err


def _describe_weights_file(path: Path) -> str:
    """The description stored in a safetensors header (our converted weights carry one)."""
    fallback = "user-supplied state dict"
    return read_weights_metadata(path).get("source", fallback) if path.suffix == ".safetensors" else fallback


def read_weights_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata (source, architecture, onnx_sha256) of a converted weights file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return dict(weights.metadata() or {})
    except (OSError, SafetensorError) as err:
        raise UserError(f"cannot read weights {path} ({brief_reason(err)}); recreate them with: "
                        f"python -m src.convert_weights --out {path}") from err
