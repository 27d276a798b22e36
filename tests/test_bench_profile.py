"""bench/profile_step.py reads what the GPU ran from the profiler's Chrome trace: every kernel,
memset and copy counts (kernel names may hold '#', as in `{lambda()#1}`), annotation ranges that
also sit on the GPU timeline do not, and overlapping kernels count once towards busy time."""

from __future__ import annotations

import gzip
import json

from bench.profile_step import busy_time, gpu_spans, kernel_class


def _trace(path, events):
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    return str(path)


def test_gpu_spans_from_trace(tmp_path):
    lambda_kernel = ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda"
                     "(at::TensorIteratorBase&)::{lambda()#3}::operator()() const>")
    events = [
        {"cat": "gpu_user_annotation", "name": "## Call CompiledFxGraph abc", "ts": 0, "dur": 100},
        {"cat": "gpu_user_annotation", "name": "Optimizer.step#AdamW.step", "ts": 60, "dur": 40},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5},
        {"cat": "kernel", "name": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "ts": 10, "dur": 30},
        {"cat": "gpu_memset", "name": "Memset (Device)", "ts": 5, "dur": 2},
        {"cat": "kernel", "name": lambda_kernel, "ts": 35, "dur": 10},  # overlaps the GEMM by 5
        {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 50, "dur": 4},
        {"cat": "kernel", "name": "multi_tensor_apply_kernel adam", "ts": 70, "dur": 0},  # no duration
        {"ph": "f", "name": "ac2g", "ts": 10},
    ]
    spans = gpu_spans(_trace(tmp_path / "t.json.gz", events))
    assert [name for *_, name in spans] == ["Memset (Device)",
                                            "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT",
                                            lambda_kernel, "Memcpy DtoD (Device -> Device)"]
    assert busy_time(spans) == 2 + 35 + 4  # [5,7] + [10,45] + [50,54]
    assert [kernel_class(n) for *_, n in spans] == ["copy / cast", "GEMM", "copy / cast", "copy / cast"]
