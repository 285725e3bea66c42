"""Device profiles: bundled YAMLs, validation errors and the host profile."""

from __future__ import annotations

import os
import platform

import pytest
import yaml

from dsk_compress.devices import DEVICES_DIR, DeviceProfile, device_names, host_profile, list_devices, load_device
from dsk_compress.errors import DeviceError

EXPECTED = {"host-cpu", "rpi4", "rpi5", "jetson-orin-nano", "jetson-agx-orin", "gpu-server"}


def _rpi4_dict() -> dict:
    return yaml.safe_load((DEVICES_DIR / "rpi4.yaml").read_text())


def test_bundled_profiles_include_expected_names():
    assert EXPECTED <= set(device_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bundled_profile_loads_with_sources(name):
    d = load_device(name)
    assert isinstance(d, DeviceProfile)
    assert d.name == name
    assert d.peak_gflops > 0 and d.memory_bandwidth_gbs > 0
    for key in ("peak_gflops", "memory_bandwidth_gbs"):
        assert d.sources.get(key, "").strip(), f"{name} has no source for {key}"
    assert d.execution_providers[-1] == "CPUExecutionProvider"


def test_list_devices_returns_every_bundled_profile():
    assert {d.name for d in list_devices()} == set(device_names())


def test_jetson_profiles_use_dense_int8_figures():
    nano, agx = load_device("jetson-orin-nano"), load_device("jetson-agx-orin")
    assert (nano.peak_gflops, nano.peak_gflops_precision) == (20000, "int8")
    assert (agx.peak_gflops, agx.peak_gflops_precision) == (85000, "int8")
    assert "275" in agx.sources["peak_gflops"]


def test_load_device_unknown_name_lists_valid_names():
    with pytest.raises(DeviceError) as ei:
        load_device("pi-zero")
    msg = str(ei.value)
    assert "pi-zero" in msg
    for name in EXPECTED:
        assert name in msg


def test_load_device_typo_key_names_the_key(tmp_path):
    data = _rpi4_dict()
    data["peak_gflop"] = data.pop("peak_gflops")
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(DeviceError) as ei:
        load_device(str(p))
    assert "peak_gflop" in str(ei.value)
    assert "unknown field" in str(ei.value)


def test_load_device_bad_value_names_the_field(tmp_path):
    data = _rpi4_dict()
    data["cores"] = 0
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(DeviceError, match="cores"):
        load_device(p)


def test_load_device_missing_source_is_rejected(tmp_path):
    data = _rpi4_dict()
    del data["sources"]["memory_bandwidth_gbs"]
    p = tmp_path / "nosrc.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(DeviceError, match="memory_bandwidth_gbs"):
        load_device(p)


def test_load_device_invalid_yaml_raises_device_error(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(DeviceError, match="not valid YAML"):
        load_device(p)


def test_load_device_missing_file_raises_device_error(tmp_path):
    with pytest.raises(DeviceError, match="not found"):
        load_device(tmp_path / "nope.yaml")


def test_load_device_custom_path_loads(tmp_path):
    data = _rpi4_dict()
    data["name"] = "my-board"
    p = tmp_path / "my-board.yaml"
    p.write_text(yaml.safe_dump(data))
    assert load_device(str(p)).name == "my-board"


def test_device_profile_is_frozen():
    d = load_device("rpi5")
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        d.cores = 99  # type: ignore[misc]


def test_host_profile_reports_real_machine():
    h = host_profile()
    assert h.cores == os.cpu_count()
    assert 1 <= h.threads <= h.cores
    assert h.memory_gb > 0
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert h.arch == "x86_64"
    elif platform.machine().lower() in ("aarch64", "arm64"):
        assert h.arch == "aarch64"
    assert h.sources["peak_gflops"] and h.sources["memory_bandwidth_gbs"]


def test_host_cpu_by_name_is_this_machine():
    import os

    assert load_device("host-cpu").cores == os.cpu_count()
