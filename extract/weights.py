"""Weights for stage one's networks: reading state-dict files safely, torchvision's weights from the torch hub
cache (downloaded, with a timeout, only when absent), strict loading with a readable list of what does not fit,
seeded random init, and the sha256 that identifies a set of weights in provenance.

Set VIDSHIFT_OFFLINE=1 on machines without network to fail at once, with instructions, instead of trying.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import nn

if TYPE_CHECKING:  # torchvision costs ~1 s to import (torch._dynamo), which `store import`'s workers never need
    from torchvision.models import WeightsEnum

OFFLINE_ENV = "VIDSHIFT_OFFLINE"
DOWNLOAD_TIMEOUT_S = 30  # per connect/read; a slow download still finishes, a black-holed one fails


class WeightsUnavailable(ValueError):
    """Weights could not be found or fetched; the message names the file to provide and where to put it."""


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Identity of a set of weights, whatever file or format they came from.

    sha256 over the entries in sorted key order; each entry contributes the line "name dtype shape\\n"
    (e.g. "conv1.weight torch.float32 (64, 3, 7, 7)\\n") followed by the tensor's raw bytes (C order, native
    byte order, i.e. little-endian on every platform torch ships for). BatchNorm's `num_batches_tracked`
    counters are skipped: they do not affect inference and older checkpoints lack them.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        if name.endswith("num_batches_tracked"):
            continue
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def seeded(build_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build_model()`` initialised on a forked RNG: the same seed gives the same weights whatever the caller did
    with the global RNG, and the caller's RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model()


CHECKPOINT = "a checkpoint or weights file written by vidshift or torchvision"


def safe_load(path: Path, map_location: str | torch.device = "cpu", kind: str = CHECKPOINT):
    """``torch.load(path, weights_only=True)``, for any .pt/.pth file vidshift reads (weights, checkpoints).

    weights_only unpickles tensors and plain containers only, so a tampered or foreign file is refused before
    any of its code can run. torch's message for that advises ``weights_only=False``, the one thing not to do
    with a file one does not trust; this raises a ValueError naming the file and ``kind`` (what it should
    have been) instead.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, EOFError) as error:
        reason = _load_refusal(error)
    except RuntimeError as error:
        if not str(error).startswith("PytorchStreamReader"):  # not the file's fault (e.g. a device error)
            raise
        reason = "damaged: " + str(error).split(".")[0]
    raise ValueError(f"{path}: refused, not {kind} ({reason}); it was not unpickled, since unpickling a file "
                     f"that holds other objects can run code from it") from None


def _load_refusal(error: Exception) -> str:
    """What torch found in a refused file, e.g. 'Unsupported global: GLOBAL x.Y'; never torch's advice."""
    if isinstance(error, EOFError):
        return "empty or cut short"
    text = str(error)
    found = (re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|$)", text, re.MULTILINE)
             or re.search(r"unsupported (GLOBAL \S+)", text))
    if found:
        return found.group(1).strip()
    return "it holds something other than tensors and plain containers, or is damaged"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict (or {"state_dict": ...}) from a file, refusing anything that is not plain named tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; give the path of a state dict saved with "
                                f"torch.save(model.state_dict(), path), or see --help for the named weights")
    loaded = safe_load(path, kind="a plain state dict, as torch.save(model.state_dict(), path) writes it")
    if isinstance(loaded, dict) and "state_dict" in loaded:
        loaded = loaded["state_dict"]
    if not (isinstance(loaded, dict) and loaded
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())):
        raise ValueError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict of named tensors; "
                         f"save weights with torch.save(model.state_dict(), path)")
    return loaded


def torchvision_state_dict(weights: WeightsEnum) -> dict[str, torch.Tensor]:
    """torchvision's weights from the torch hub cache, where torchvision itself keeps them; downloaded if absent."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)
    if not cached.is_file():
        _download(weights, cached)
    return read_state_dict(cached)


def _download(weights: WeightsEnum, destination: Path) -> None:
    def not_available(reason: str) -> WeightsUnavailable:
        return WeightsUnavailable(
            f"torchvision weights {weights!r} are not in the torch hub cache and {reason}. Download {weights.url} "
            f"on a machine with network and put it at {destination} (the cache is $TORCH_HOME/hub/checkpoints; "
            f"set TORCH_HOME to use another directory), or pass the path of a local state dict as the weights.")

    if os.environ.get(OFFLINE_ENV, "0") not in ("", "0"):
        raise not_available(f"{OFFLINE_ENV} is set, so downloading is not attempted")
    destination.parent.mkdir(parents=True, exist_ok=True)
    # torchvision's file names carry a prefix of the file's sha256, which torch checks after downloading.
    hash_match = torch.hub.HASH_REGEX.search(destination.name)
    # torch.hub opens the URL without a timeout: on a node whose firewall drops packets it would hang for
    # minutes. The default socket timeout is the only way to give it one, so it is set just for this call.
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(weights.url, str(destination), hash_match.group(1) if hash_match else None)
    except (OSError, RuntimeError) as error:  # URLError and timeouts are OSErrors; a bad hash is a RuntimeError
        raise not_available(f"downloading it failed ({error})") from error
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str, source: str,
                 classifier: tuple[str, ...] = ("fc.",),
                 key_examples: str = "'conv1.weight', 'layer1.0.bn1.running_mean'") -> None:
    """Strict load, except that the ``classifier`` entries may be absent or anything: the classifier is cut away."""
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(classifier)}
    # BatchNorm fills in num_batches_tracked itself when older checkpoints lack it.
    missing = [k for k in expected
               if k not in given and not k.startswith(classifier) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    misshapen = [f"{k} {tuple(v.shape)} instead of {tuple(expected[k].shape)}"
                 for k, v in given.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshapen:
        raise ValueError(f"weights {source} do not fit {model_name} (expected keys like {key_examples}): "
                         f"{len(missing)} missing {_some(missing)}, {len(unexpected)} unexpected {_some(unexpected)}, "
                         f"{len(misshapen)} of the wrong shape {_some(misshapen)}")
    model.load_state_dict(given, strict=False)


def _some(keys: list[str], limit: int = 10) -> list[str]:
    return keys[:limit] + ([f"... {len(keys) - limit} more"] if len(keys) > limit else [])
