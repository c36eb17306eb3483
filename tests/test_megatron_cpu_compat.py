"""megatron_tasp.megatron.cpu_compat: Megatron-Core on CPU/gloo without CUDA or Triton."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.megatron_helpers import require_megatron

require_megatron()
pytestmark = pytest.mark.megatron

from megatron_tasp.megatron import cpu_compat  # noqa: E402


def test_enable_is_idempotent_and_active_on_cpu():
    assert not torch.cuda.is_available()
    assert cpu_compat.enable_cpu_megatron() is True
    assert cpu_compat.enable_cpu_megatron() is True
    assert cpu_compat.cpu_shims_active()
    assert torch.cuda.current_device() == torch.device("cpu")


def test_paged_stash_stand_in_raises_clearly():
    import importlib.util

    mod = sys.modules.get(cpu_compat.PAGED_STASH_MODULE)
    if importlib.util.find_spec("triton") is not None or mod is None:
        pytest.skip("triton installed or this megatron-core has no paged stash module")
    assert mod.GLOBAL_BLOCK_SIZE == 1024
    with pytest.raises(RuntimeError, match="Triton"):
        mod.paged_stash_copy_kernel[(1,)](1, 2)
    assert cpu_compat.install_paged_stash_stand_in() is False  # already there


def test_default_causal_mask_on_cpu():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    for fn in (fused_softmax.get_default_causal_mask, tutils.get_default_causal_mask):
        m = fn(4)
        assert m.device.type == "cpu" and m.dtype == torch.bool
        assert torch.equal(m, torch.ones(4, 4, dtype=torch.bool).triu(1))


def test_sliding_window_mask_matches_definition():
    from megatron.core.transformer import utils as tutils

    m = tutils.get_sliding_window_causal_mask(3, 5, (1, 0))
    # query i sits at key position i + 2; it sees keys [i + 1, i + 2]
    want = torch.ones(3, 5, dtype=torch.bool)
    for i in range(3):
        want[i, i + 1:i + 3] = False
    assert torch.equal(m, want)


def test_rope_cp_slicing_is_zigzag():
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    class Group:
        def __init__(self, size, rank):
            self._s, self._r = size, rank

        def size(self):
            return self._s

        def rank(self):
            return self._r

    emb = torch.arange(16.0).view(16, 1, 1, 1)
    for fn in (rope_utils.get_pos_emb_on_this_cp_rank, rotary_pos_embedding.get_pos_emb_on_this_cp_rank):
        out = fn(emb, 0, Group(4, 1))
        assert out.flatten().tolist() == [2.0, 3.0, 12.0, 13.0]


def test_model_parallel_rng_seeding_and_fork():
    from megatron_tasp.launch import run_workers

    def worker(rank, world):
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

        parallel_state.initialize_model_parallel()
        try:
            model_parallel_cuda_manual_seed(123)
            outside = torch.rand(3)
            with get_cuda_rng_tracker().fork():
                a = torch.rand(3)
            model_parallel_cuda_manual_seed(123)
            torch.rand(3)
            with get_cuda_rng_tracker().fork():
                b = torch.rand(3)
            return torch.equal(a, b), torch.equal(a, outside)
        finally:
            parallel_state.destroy_model_parallel()

    same, equal_outside = run_workers(worker, 1)[0]
    assert same and not equal_outside
