"""Which precision a run computes in: ``--mixed-precision auto`` resolved for the device it runs on.

``auto`` means bf16 autocast on a CPU with native bf16 instructions and fp32 everywhere else:

* CPU with ``avx512_bf16`` or ``amx_bf16`` (x86: Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) or the
  Arm ``bf16`` extension: bf16. oneDNN then runs the matrix products in bf16 (1.7x the training and 1.6x the
  evaluation throughput of fp32 on this project's AMD EPYC, 13% less peak memory; docs/training.md); the
  weights, gradients and AdamW moments stay fp32 (autocast only casts the inputs of matrix products) and the loss
  is computed in fp32.
* Other CPUs: fp32 (``no``). torch would emulate bf16 there, which is slower than fp32.
* GPUs and other accelerators: fp32 (``no``), as before this option existed: a GPU run of the reproduction
  stays comparable with earlier ones, and the bf16/fp32 accuracy parity was measured on CPU only. Ask for
  ``--mixed-precision bf16`` (or ``fp16``) explicitly there.

``no`` is fp32; ``bf16`` and ``fp16`` are used as asked. Only this module decides, and it says why (a log line
and ``config.json``'s ``resolved`` section).
"""

from __future__ import annotations

import platform
from pathlib import Path

# Instruction-set flags of native bf16 arithmetic (torch.cpu.get_capabilities() keys; /proc/cpuinfo names).
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)


def cpu_bf16_flags() -> list[str]:
    """The native-bf16 instruction-set flags of this CPU (empty when it has none, or when they cannot be read)."""
    found: set[str] = set()
    try:
        import torch

        capabilities = torch.cpu.get_capabilities()
        found |= {flag for flag in X86_BF16_FLAGS if capabilities.get(flag)}
    except (AttributeError, RuntimeError):  # older torch: no get_capabilities
        pass
    found |= set(_cpuinfo_flags()) & set(X86_BF16_FLAGS + ARM_BF16_FLAGS)
    return sorted(found)


def _cpuinfo_flags() -> list[str]:
    """The flags of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.split()
    return []


def resolve_mixed_precision(requested: str, device_type: str) -> tuple[str, str]:
    """(accelerate's mixed precision, why) for ``--mixed-precision requested`` on a device of ``device_type``."""
    if requested != "auto":
        return requested, f"--mixed-precision {requested}"
    if device_type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bf16", (f"auto: this CPU has native bf16 instructions ({', '.join(flags)}); "
                            "--mixed-precision no for fp32")
        return "no", f"auto: fp32, this CPU ({platform.machine() or 'unknown'}) has no native bf16 instructions"
    return "no", (f"auto: fp32 on {device_type} (dlfa autocasts only on CPUs with native bf16); "
                  "--mixed-precision bf16 for bf16")


def precision_name(mixed_precision: str) -> str:
    """'bf16', 'fp16' or 'fp32' (accelerate calls fp32 'no')."""
    return "fp32" if mixed_precision == "no" else mixed_precision
