"""What is this box? CPU, memory, the inference devices OpenVINO and ONNX Runtime see,
the shipped profiles that match, and the runtime settings to start from.

Torch-free, and safe on any host: every fact that cannot be read is reported as
unknown rather than raising.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .profiles import Profile, shipped_profiles

# CPU features that decide whether INT8 pays off: 8-bit dot-product instructions.
INT8_DOT = {
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "amx_int8": "AMX-INT8",
    "asimddp": "Arm dot product (SDOT/UDOT)",
}
REPORTED = ("sse4_2", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16",
            "asimd", "asimddp", "sve", "i8mm")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def cpu_facts(cpuinfo: str | None = None) -> dict:
    """Model name and the relevant feature flags, from /proc/cpuinfo (Linux); elsewhere
    what the platform module knows."""
    text = _read("/proc/cpuinfo") if cpuinfo is None else cpuinfo
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return {"cpu_model": model or platform.processor() or "unknown",
            "cpu_features": sorted(f for f in flags if f in REPORTED)}


def memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def inference_devices() -> dict:
    """OpenVINO devices with their full names, and ONNX Runtime's execution providers."""
    out: dict = {"openvino": None, "onnxruntime": None}
    try:
        import openvino as ov

        core = ov.Core()
        devices = {}
        for d in core.available_devices:
            try:
                devices[d] = str(core.get_property(d, "FULL_DEVICE_NAME"))
            except Exception:  # noqa: BLE001 - a device that cannot describe itself is still listed
                devices[d] = "unknown"
        out["openvino"] = {"version": ov.get_version(), "devices": devices}
    except Exception as exc:  # noqa: BLE001 - missing or broken OpenVINO is a fact to report
        out["openvino"] = {"error": f"{exc.__class__.__name__}: {exc}"[:200]}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except Exception as exc:  # noqa: BLE001
        out["onnxruntime"] = {"error": f"{exc.__class__.__name__}: {exc}"[:200]}
    return out


def probe_host(cpuinfo: str | None = None, with_devices: bool = True) -> dict:
    host = {"arch": platform.machine().lower(), "cores": os.cpu_count(), "memory_gb": memory_gb(),
            "os": f"{platform.system()} {platform.release()}",
            "board": _read("/sys/firmware/devicetree/base/model").strip("\x00\n ")}
    host.update(cpu_facts(cpuinfo))
    if host["arch"] == "amd64":
        host["arch"] = "x86_64"
    if host["arch"] == "arm64":
        host["arch"] = "aarch64"
    host["int8_dot_product"] = [INT8_DOT[f] for f in host["cpu_features"] if f in INT8_DOT]
    if with_devices:
        host.update(inference_devices())
    return host


def matching_profiles(host: dict, profiles: list[Profile] | None = None) -> list[Profile]:
    """Shipped profiles that describe this host, most specific first."""
    profiles = shipped_profiles() if profiles is None else profiles
    return sorted((p for p in profiles if p.matches(host)), key=lambda p: -p.specificity)


def recommend(host: dict, profiles: list[Profile] | None = None) -> dict:
    """Where to start: the best-matching profile's runtime settings, else a rule of thumb
    (INT8 where the CPU has 8-bit dot products). Always to be checked with `lineside bench`."""
    found = matching_profiles(host, profiles)
    if found:
        return {"profile": found[0].name, "runtime": dict(found[0].runtime),
                "why": f"this host matches profile {found[0].name} ({found[0].title})"}
    ov_devices = (host.get("openvino") or {}).get("devices") or {}
    backend = "openvino" if ov_devices else "onnxruntime"
    precision = "int8" if host.get("int8_dot_product") else "fp32"
    why = (f"no shipped profile matches; the CPU has {', '.join(host['int8_dot_product'])}, so INT8 should pay off"
           if precision == "int8" else
           "no shipped profile matches; the CPU has no 8-bit dot-product instructions, so start from FP32 "
           "and measure INT8 with lineside bench")
    return {"profile": None, "runtime": {"backend": backend, "device": "CPU", "precision": precision}, "why": why}


def auto_profile() -> Profile:
    """`--profile auto`: the shipped profile that matches this host best, else a profile
    made of the rule of thumb in recommend()."""
    host = probe_host()
    found = matching_profiles(host)
    if found:
        return found[0]
    rec = recommend(host, profiles=[])
    return Profile(name="auto", title=rec["why"], path=Path("(probed)"), runtime=rec["runtime"])
