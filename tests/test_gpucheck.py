"""The GPU check: kernel parity and bf16 throughput at base size (runs only where CUDA is)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_mamba_ssm_kernels_match_the_chunked_scan():
    pytest.importorskip("mamba_ssm")
    from ehrlong.gpucheck import kernel_parity

    errors = kernel_parity(length=1024)
    assert all(err <= 1e-3 for err in errors.values()), errors


def test_base_size_trains_a_step_in_bf16():
    from ehrlong.gpucheck import throughput

    row = throughput("transformer_4k", vocab=8192, steps=1)
    assert row["tokens_per_s"] > 0 and 0 < row["peak_gib"] < 100
