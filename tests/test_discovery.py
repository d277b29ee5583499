"""Device discovery through a fake NVML: no GPU, one, two."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pynvml
import pytest
import trio

from cortex.harness import LoadedModel, LoadSpec, Placement, hookimpl
from cortex.neuron import discovery
from cortex.testing import FakeEngine
from tests.neuron_helpers import running_neuron

MiB = 1024 * 1024


class FakeNvml:
    """The part of pynvml the neuron uses, for a host with ``cards``."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, cards: list[dict]) -> None:
        self.cards = cards
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 13000

    def nvmlDeviceGetCount(self) -> int:
        return len(self.cards)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict:
        return self.cards[index]

    def nvmlDeviceGetUUID(self, card: dict) -> str:
        return card["uuid"]

    def nvmlDeviceGetName(self, card: dict) -> bytes:
        return card["name"].encode()  # older bindings return bytes

    def nvmlDeviceGetCudaComputeCapability(self, card: dict) -> tuple[int, int]:
        return card["cc"]

    def nvmlDeviceGetMemoryInfo(self, card: dict) -> SimpleNamespace:
        return SimpleNamespace(
            total=card["total"] * MiB,
            used=card["used"] * MiB,
            free=(card["total"] - card["used"]) * MiB,
        )

    def nvmlDeviceGetUtilizationRates(self, card: dict) -> SimpleNamespace:
        if card.get("util") is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return SimpleNamespace(gpu=card["util"], memory=0)

    def nvmlDeviceGetTemperature(self, card: dict, sensor: int) -> int:
        return card["temp"]


TWO_GPUS = [
    {
        "uuid": "GPU-aaaa",
        "name": "NVIDIA H100 80GB HBM3",
        "cc": (9, 0),
        "total": 81559,
        "used": 1024,
        "util": 37,
        "temp": 41,
    },
    {
        "uuid": "GPU-bbbb",
        "name": "NVIDIA GeForce RTX 4090",
        "cc": (8, 9),
        "total": 24564,
        "used": 500,
        "util": None,
        "temp": 55,
    },
]


class NoNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def test_two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(TWO_GPUS)
    monkeypatch.setattr(discovery, "pynvml", fake)
    nvml = discovery.Nvml()
    nvml.start()
    found = discovery.discover(nvml, [])
    assert found.driver_version == "580.65.06"
    assert found.cuda_version == "13.0"
    assert [
        (d.index, d.uuid, d.name, d.vram_total_mb, d.compute_capability) for d in found.devices
    ] == [
        (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3", 81559, "9.0"),
        (1, "GPU-bbbb", "NVIDIA GeForce RTX 4090", 24564, "8.9"),
    ]
    samples = nvml.sample()
    assert [(s.vram_used_mb, s.vram_free_mb, s.utilization_pct, s.temp_c) for s in samples] == [
        (1024, 80535, 37, 41),
        (500, 24064, None, 55),
    ]
    nvml.stop()
    assert fake.shutdowns == 1


def test_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "pynvml", NoNvml([]))
    nvml = discovery.Nvml()
    nvml.start()
    found = discovery.discover(nvml, [])
    assert found.devices == [] and found.cuda_version is None
    assert found.ram_total_mb > 0 and found.cpu.cores >= 1
    assert nvml.sample() == []


async def test_neuron_reports_fake_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    cards = [dict(card) for card in TWO_GPUS]
    monkeypatch.setattr(discovery, "pynvml", FakeNvml(cards))
    async with running_neuron() as handle:
        async with httpx.AsyncClient(base_url=handle.url) as http:
            with trio.fail_after(10):
                found = (await http.get("/discovery")).json()
                assert [d["uuid"] for d in found["devices"]] == ["GPU-aaaa", "GPU-bbbb"]
                health = (await http.get("/health")).json()
                assert [d["vram_used_mb"] for d in health["devices"]] == [1024, 500]
                # The sampler task refreshes health; wait for it to see the change.
                cards[0]["used"] = 2048
                # Polling over HTTP is the point here: the sampler has no event to wait on.
                while (await http.get("/health")).json()["devices"][0]["vram_used_mb"] != 2048:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                metrics = (await http.get("/metrics")).text
    assert 'cortex_neuron_device_memory_used_bytes{device="0"}' in metrics
    assert 'cortex_neuron_device_temperature_celsius{device="1"} 55.0' in metrics


class RecordingEngine(FakeEngine):
    """The fake engine, remembering where each load was placed."""

    def __init__(self) -> None:
        super().__init__()
        self.placements: list[Placement] = []

    @hookimpl
    def cortex_harness_load(self, spec: LoadSpec, placement: Placement) -> LoadedModel | None:
        self.placements.append(placement)
        return super().cortex_harness_load(spec, placement)


async def test_gpu_placement_defaults_to_every_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(discovery, "pynvml", FakeNvml([dict(card) for card in TWO_GPUS]))
    model = tmp_path / "m.fake"
    model.write_text("fake")
    engine = RecordingEngine()
    async with running_neuron(plugins=[engine]) as handle:
        async with httpx.AsyncClient(base_url=handle.url) as http:
            with trio.fail_after(10):
                everywhere = await http.post(
                    "/models/load", json={"model_id": "a", "source": str(model)}
                )
                second = await http.post(
                    "/models/load", json={"model_id": "b", "source": str(model), "devices": [1]}
                )
                missing = await http.post(
                    "/models/load", json={"model_id": "c", "source": str(model), "devices": [5]}
                )
    assert everywhere.json()["model"]["devices"] == [0, 1]
    assert second.json()["model"]["devices"] == [1]
    assert missing.status_code == 400 and "no such devices" in missing.json()["error"]["message"]
    # The engine fits the model into 90% of what the devices have free.
    assert [(p.devices, p.memory_budget_mb) for p in engine.placements] == [
        ((0, 1), (80535 + 24064) * 9 // 10),
        ((1,), 24064 * 9 // 10),
    ]
