"""The fine-tunes' precision follows what the device does well (issue 30).

``precision="auto"`` must never pick bfloat16 autocast on a CPU that emulates it (measured 8.7×
slower than fp32 on an AVX2-only CPU), and a fine-tune made at one precision must never be
reused as if it were the other.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch

from rephelpers.errors import RephelpersError
from rephelpers.testbed import finetune as ft


def test_an_explicit_precision_is_kept_and_a_wrong_one_refused():
    assert ft.resolve_precision("fp32", "cpu") == "fp32"
    assert ft.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(RephelpersError, match="precision must be one of"):
        ft.resolve_precision("half", "cpu")
    with pytest.raises(RephelpersError, match="precision must be one of"):
        ft.FineTuneConfig(precision="bfloat16")
    assert ft.FineTuneConfig().precision == "auto"


def test_auto_on_a_cpu_takes_bf16_only_where_native_and_measured_faster(monkeypatch):
    monkeypatch.setattr(ft, "native_cpu_bf16", lambda: False)
    monkeypatch.setattr(ft, "probe_bf16_speedup", lambda *a: pytest.fail("no probe without native bf16"))
    assert ft.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(ft, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(ft, "probe_bf16_speedup", lambda *a: 1.9)
    assert ft.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(ft, "probe_bf16_speedup", lambda *a: 1.02)  # native but no faster here: fp32
    assert ft.resolve_precision("auto", "cpu") == "fp32"
    assert ft.resolve_precision("auto", "meta") == "fp32"  # any other device: the safe choice


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="AVX2 dispatch exists on x86 only")
def test_torch_kernels_turned_down_to_avx2_resolve_auto_to_fp32():
    # ATEN_CPU_CAPABILITY=avx2 makes torch dispatch as on an AVX2-only CPU: get_cpu_capability()
    # then reports AVX2, whatever the flags say, and bf16 would be emulated.
    code = ("from rephelpers.testbed import finetune as ft; import torch;"
            "print(torch.backends.cpu.get_cpu_capability(), ft.native_cpu_bf16(), ft.resolve_precision('auto', 'cpu'))")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["AVX2", "False", "fp32"], out


def test_the_probe_measures_a_positive_ratio_once_per_process():
    ft.probe_bf16_speedup.cache_clear()
    ratio = ft.probe_bf16_speedup("cpu", torch.get_num_threads())
    assert ratio > 0 and ft.probe_bf16_speedup.cache_info().misses == 1
    assert ft.probe_bf16_speedup("cpu", torch.get_num_threads()) == ratio
    assert ft.probe_bf16_speedup.cache_info().hits == 1


def test_the_record_says_what_was_asked_and_what_ran(monkeypatch):
    monkeypatch.setattr(ft, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(ft, "probe_bf16_speedup", lambda *a: 0.5)
    record = ft.precision_record(ft.FineTuneConfig(), "cpu")
    assert record["asked"] == "auto" and record["resolved"] == "fp32" and record["bf16_speedup"] == 0.5
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.model
def test_the_resolved_precision_keys_the_finetune(model, monkeypatch):
    blocks = ft.pack_blocks(["The weather report says rain is likely in the north. " * 6] * 2, ["a", "b"],
                            model.tokenizer, 16)
    key = lambda precision: ft.finetune_key(model, blocks, ft.FineTuneConfig(precision=precision), [])
    assert key("bf16") != key("fp32")
    monkeypatch.setattr(ft, "resolve_precision", lambda precision, device: "fp32" if precision == "auto" else precision)
    assert key("auto") == key("fp32")  # "auto" is never a key of its own: its resolution is
    monkeypatch.setattr(ft, "resolve_precision", lambda precision, device: "bf16" if precision == "auto" else precision)
    assert key("auto") == key("bf16")
