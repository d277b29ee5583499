"""What this host is and has: CPU, RAM, and NVIDIA devices through NVML.

NVML comes from nvidia-ml-py (the ``pynvml`` module), never from parsing
nvidia-smi. A host without a GPU, a driver or the library still answers
everything else: its device list is empty. All functions here block (NVML
and /proc reads); the neuron calls them in a worker thread.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
from typing import Any

import pynvml

from cortex.fleet import Cpu, Device, DeviceSample, Discovery

log = logging.getLogger(__name__)

MiB = 1024 * 1024


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_total_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // MiB


class Nvml:
    """NVIDIA devices through NVML; empty when NVML cannot start.

    ``start()`` once, ``stop()`` at the end; in between ``devices()`` and
    ``sample()`` are safe to call from worker threads.
    """

    def __init__(self) -> None:
        self.available = False
        self.driver_version: str | None = None
        self.cuda_version: str | None = None

    def start(self) -> None:
        try:
            pynvml.nvmlInit()
        except (pynvml.NVMLError, OSError) as exc:
            log.info("no NVIDIA devices (NVML: %s)", exc)
            return
        self.available = True
        try:
            self.driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
            cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
            self.cuda_version = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except pynvml.NVMLError as exc:
            log.warning("NVML: cannot read driver versions: %s", exc)

    def stop(self) -> None:
        if self.available:
            self.available = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    def _handles(self) -> list[tuple[int, Any]]:
        if not self.available:
            return []
        return [
            (i, pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())
        ]

    def devices(self) -> list[Device]:
        devices = []
        for index, handle in self._handles():
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            devices.append(
                Device(
                    index=index,
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    vram_total_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // MiB,
                    compute_capability=f"{major}.{minor}",
                )
            )
        return devices

    def sample(self) -> list[DeviceSample]:
        samples = []
        for index, handle in self._handles():
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            # Utilisation and temperature are missing on some boards (and in MIG
            # mode): report None rather than dropping the device.
            try:
                utilization: int | None = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except pynvml.NVMLError:
                utilization = None
            try:
                temp: int | None = int(
                    pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
                )
            except pynvml.NVMLError:
                temp = None
            samples.append(
                DeviceSample(
                    index=index,
                    vram_used_mb=int(memory.used) // MiB,
                    vram_free_mb=int(memory.free) // MiB,
                    utilization_pct=utilization,
                    temp_c=temp,
                )
            )
        return samples


def discover(nvml: Nvml, harnesses: list[Any]) -> Discovery:
    uname = platform.uname()
    return Discovery(
        hostname=socket.gethostname(),
        os=f"{uname.system} {_os_release()}".strip(),
        kernel=uname.release,
        cpu=Cpu(model=cpu_model(), cores=os.cpu_count() or 1),
        ram_total_mb=ram_total_mb(),
        cuda_version=nvml.cuda_version,
        driver_version=nvml.driver_version,
        devices=nvml.devices(),
        harnesses=harnesses,
    )


def _os_release() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        return ""
