"""Packed documents (THD) on the Megatron side: arguments, PackedSeqParams plumbing into tasp_attention,
the per-document batch split, and its installation by the launcher and the Megatron-LM patch.

The attention tests substitute ``megatron_tasp.attention.tasp_attention`` (looked up when called) with a
recorder; the batch-split tests marked ``needs_thd_partition`` use ``megatron_tasp.thd.partition_index``.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests import megatron_helpers as H

H.require_megatron()
pytestmark = pytest.mark.megatron

from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

from megatron_tasp.launch import WorkerError, run_workers  # noqa: E402
from megatron_tasp.megatron import thd_batch  # noqa: E402
from megatron_tasp.megatron.args import (  # noqa: E402
    TaspArgumentError,
    packed_split_of,
    tasp_options_from_args,
    validate_tasp_args,
)
from megatron_tasp.megatron.core_attention import TaspDotProductAttention, thd_cu_seqlens  # noqa: E402
from megatron_tasp.options import TaspOptions  # noqa: E402
from tests.test_megatron_thd_gpt import layout  # noqa: E402  (Transformer Engine's THD split, written out)

CU = torch.tensor([0, 5, 16, 18, 24], dtype=torch.int32)        # real lengths 5, 11, 2, 6
CU_PAD = torch.tensor([0, 8, 20, 24, 32], dtype=torch.int32)    # each padded to a multiple of 4 (CP 2)


@dataclass
class PG:
    cp: object = None


def _make(**kw):
    args = dict(config=H.tiny_config(1), layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                cp_comm_type=None, softmax_scale=None, pg_collection=PG())
    args.update(kw)
    return TaspDotProductAttention(**args)


def _packed(cu=CU, cu_pad=CU_PAD, **kw):
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
                           cu_seqlens_kv_padded=cu_pad, max_seqlen_q=12, max_seqlen_kv=12, **kw)


def _qkv(t=32, h=4, g=2, d=16, dv=None, batch_dim=False):
    gen = torch.Generator().manual_seed(0)
    shape = (lambda n, dd: (t, 1, n, dd)) if batch_dim else (lambda n, dd: (t, n, dd))
    return (torch.randn(*shape(h, d), generator=gen), torch.randn(*shape(g, d), generator=gen),
            torch.randn(*shape(g, dv or d), generator=gen))


@pytest.fixture
def recorder(monkeypatch):
    """Replace tasp_attention (looked up at call time) with a recorder returning q's shape."""
    import megatron_tasp.attention as attention_mod

    calls: list[dict] = []

    def fake(q, k, v, cp_group, **kw):
        calls.append({"q": q, "k": k, "v": v, "cp_group": cp_group, **kw})
        return q[..., : q.shape[-1]] * 0 + 1.0 + torch.arange(q.shape[-1], dtype=q.dtype)

    monkeypatch.setattr(attention_mod, "tasp_attention", fake)
    return calls


# ---------------------------------------------------------------------------------------------------- arguments


def _ns(**kw):
    return SimpleNamespace(context_parallel_backend="tasp", cp_comm_type=["p2p"], **kw)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_sft_accepted_with_tasp(cp):
    a = validate_tasp_args(_ns(sft=True, context_parallel_size=cp, seq_length=64), device_capability=None)
    assert a.cp_comm_type == ["tasp"] and a.tasp_enabled and isinstance(a.tasp_options, TaspOptions)
    a = validate_tasp_args(_ns(sft=True, dataloader_inter_document_masking=True, context_parallel_size=cp,
                               seq_length=64), device_capability=None)
    assert a.tasp_enabled


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_inter_document_masking_takes_the_sequence_split(cp):
    """Without --sft Megatron-LM splits the packed sequence as a whole (documents of any length): TASP is told
    so through options.packed_split; with --sft every document is padded and split (the default)."""
    a = validate_tasp_args(_ns(dataloader_inter_document_masking=True, context_parallel_size=cp, seq_length=64),
                           device_capability=None)
    assert a.tasp_enabled and a.tasp_options.packed_split == "sequence"
    assert packed_split_of(a) == "sequence" and tasp_options_from_args(a).packed_split == "sequence"
    a = validate_tasp_args(_ns(sft=True, dataloader_inter_document_masking=True, context_parallel_size=cp,
                               seq_length=64), device_capability=None)
    assert a.tasp_options.packed_split == "document"
    ns = _ns(dataloader_inter_document_masking=True, context_parallel_size=cp, seq_length=64)
    assert tasp_options_from_args(ns).packed_split == "sequence"  # also when validate_tasp_args did not run
    rope = _ns(dataloader_inter_document_masking=True, context_parallel_size=cp, seq_length=64,
               position_embedding_type="rope")
    if cp > 1:  # Megatron-Core's packed RoPE assumes the per-document split: fail closed, naming the fix
        with pytest.raises(TaspArgumentError, match="learned_absolute"):
            validate_tasp_args(rope, device_capability=None)
    else:
        assert validate_tasp_args(rope, device_capability=None).tasp_enabled


def test_hybrid_cp_still_rejected_with_packed_data():
    for extra in ({}, {"sft": True}):
        with pytest.raises(TaspArgumentError, match="hybrid-context-parallel"):
            validate_tasp_args(_ns(hybrid_context_parallel=True, **extra), device_capability=None)


# ------------------------------------------------------------------------------------------- attention plumbing


@pytest.mark.parametrize("batch_dim", [False, True])
def test_packed_seq_params_reach_tasp_attention(recorder, batch_dim):
    opts = TaspOptions(num_rings=1, transport="p2p")
    attn = _make(options=opts)
    q, k, v = _qkv(batch_dim=batch_dim)
    packed = _packed()
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=packed)
    assert out.shape == (32, 4 * 16)  # TE's THD core-attention output: [t, h * d]
    torch.testing.assert_close(out.view(32, 4, 16)[5, 2], 1.0 + torch.arange(16.0))
    (c,) = recorder
    assert c["q"].shape == (32, 4, 16) and c["k"].shape == (32, 2, 16) and c["v"].shape == (32, 2, 16)
    assert c["cp_group"] is None and c["causal"] is True
    # host tuples, read once per PackedSeqParams (no host synchronisation in the layers after the first)
    assert c["cu_seqlens"] == tuple(CU.tolist()) and c["cu_seqlens_padded"] == tuple(CU_PAD.tolist())
    assert c["softmax_scale"] == pytest.approx(1 / math.sqrt(16))
    assert c["options"].num_rings == 1 and c["options"].transport == "p2p"


def test_no_mask_and_unpadded_cu_seqlens(recorder):
    attn = _make(attn_mask_type=AttnMaskType.no_mask)
    q, k, v = _qkv(t=24)
    cu = torch.tensor([0, 8, 12, 24], dtype=torch.int64)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
    assert attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask, packed_seq_params=packed).shape == (24, 64)
    (c,) = recorder
    assert c["causal"] is False
    assert c["cu_seqlens"] == (0, 8, 12, 24)
    assert c["cu_seqlens_padded"] == (0, 8, 12, 24)  # no padded lengths: every token is real


def test_megatron_lm_style_params(recorder):
    """Megatron-LM's forward_step passes the padded lengths as cu_seqlens_q too: TASP then sees no padding."""
    packed = _packed(cu=CU_PAD)
    attn = _make()
    attn(*_qkv(), None, packed_seq_params=packed)
    assert recorder[0]["cu_seqlens"] == recorder[0]["cu_seqlens_padded"] == tuple(CU_PAD.tolist())


def test_boundaries_are_read_once_per_packed_params_and_never_stale(monkeypatch):
    """Every layer of a micro-batch gets the same PackedSeqParams: the boundaries are read to the host by the
    first layer of a pass only; a new pass, a modified or replaced boundary tensor, or another params object
    reads them again; inference tensors (no version counter) are read every time."""
    import megatron_tasp.megatron.core_attention as ca

    reads = []
    real = ca.thd_cu_seqlens
    monkeypatch.setattr(ca, "thd_cu_seqlens", lambda p, n=1: reads.append(p) or real(p, n))
    packed = _packed(cu=CU.clone(), cu_pad=CU_PAD.clone())
    first = ca.thd_host_boundaries(packed, 1, 1)
    assert first == (tuple(CU.tolist()), tuple(CU_PAD.tolist()))
    assert ca.thd_host_boundaries(packed, 1, 2) is first and ca.thd_host_boundaries(packed, 1, 3) is first
    assert len(reads) == 1  # the later layers of the pass: cached
    packed.cu_seqlens_q[1] += 0  # an in-place write bumps the version: read again
    assert ca.thd_host_boundaries(packed, 1, 4) == first and len(reads) == 2
    packed.cu_seqlens_q_padded.data.copy_(CU)  # refilled without a version bump (as a collective would) ...
    packed.cu_seqlens_kv_padded = packed.cu_seqlens_q_padded
    assert ca.thd_host_boundaries(packed, 1, 1)[1] == tuple(CU.tolist())  # ... the next pass reads it again
    assert len(reads) == 3
    assert ca.thd_host_boundaries(packed, 1, 1) == (tuple(CU.tolist()),) * 2 and len(reads) == 4  # same layer
    assert ca.thd_host_boundaries(_packed(), 1, 2) == first and len(reads) == 5  # another params object
    packed.local_cp_size = 2
    with pytest.raises(NotImplementedError, match="local_cp_size"):  # a cache hit still checks the params
        ca.thd_host_boundaries(packed, 1, 5)
    assert len(reads) == 5
    with torch.inference_mode():
        inf = _packed(cu=CU.clone(), cu_pad=CU_PAD.clone())
    assert ca.thd_host_boundaries(inf, 1, 1) == ca.thd_host_boundaries(inf, 1, 2) == first and len(reads) == 7


def test_mla_head_dims_trimmed(recorder):
    attn = _make(k_channels=24, v_channels=16)
    q, k, v = _qkv(h=4, g=4, d=24, dv=16)
    out = attn(q, k, v, None, packed_seq_params=_packed())
    assert out.shape == (32, 4 * 16)
    assert recorder[0]["v"].shape == (32, 4, 24)  # v zero-padded to the q/k head dim, output trimmed back
    assert recorder[0]["softmax_scale"] == pytest.approx(1 / math.sqrt(24))


def test_megatron_attention_reshapes_thd_output(recorder):
    """Megatron's own SelfAttention around the core attention: [t, 1, hidden] in and out with THD."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_tasp.megatron.spec import gpt_tasp_local_spec

    cfg = H.tiny_config(1)
    spec = gpt_tasp_local_spec(cfg).submodules.self_attention

    def worker(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel()
        try:
            attn = build_module(spec, config=cfg, layer_number=1)
            out, _ = attn(torch.randn(32, 1, 64), None, packed_seq_params=_packed())
            return [list(out.shape), [list(c["q"].shape) for c in recorder]]
        finally:
            parallel_state.destroy_model_parallel()

    assert run_workers(worker, 1)[0] == [[32, 1, 64], [[32, 4, 16]]]


@pytest.mark.parametrize("change,match", [
    (dict(qkv_format="sbhd"), "qkv_format 'thd'"),
    (dict(cu_seqlens_kv=torch.tensor([0, 8, 32], dtype=torch.int32)), "cross-attention"),
    (dict(cu_seqlens_kv_padded=torch.tensor([0, 12, 20, 24, 32], dtype=torch.int32)), "cross-attention"),
    (dict(cu_seqlens_q=None), "without cu_seqlens_q"),
    (dict(local_cp_size=2), "local_cp_size"),
    (dict(cp_group=object()), "hybrid"),
])
def test_unsupported_packed_params_fail_closed(recorder, change, match):
    packed = _packed()
    for key, value in change.items():
        setattr(packed, key, value)
    with pytest.raises(NotImplementedError, match=match):
        _make()(*_qkv(), None, packed_seq_params=packed)
    assert not recorder


def test_bad_thd_shapes_and_cross_attention_fail_closed(recorder):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"\[t, heads, dim\]"):
        _make()(q.view(16, 2, 4, 16), k.view(16, 2, 2, 16), v.view(16, 2, 2, 16), None,
                packed_seq_params=_packed())
    with pytest.raises(NotImplementedError, match="cross-attention"):
        _make(attention_type="cross")(q, k, v, None, packed_seq_params=_packed())
    with pytest.raises(ValueError, match="1-D"):
        thd_cu_seqlens(_packed(cu=CU.view(1, -1)))
    assert not recorder


# --------------------------------------------------------------------------------------------- batch partition


def _packed_batch(total: int) -> dict:
    t = torch.arange(total).view(1, total)
    return {"tokens": t.clone(), "labels": t + 1000, "loss_mask": (t % 3 != 0).float(), "position_ids": t * 7,
            "attention_mask": None, "cu_seqlens": CU.view(1, -1), "cu_seqlens_padded": CU_PAD.view(1, -1),
            "max_seqlen": torch.tensor([12])}


def test_thd_batch_split_plumbing_with_a_given_partition(monkeypatch):
    """Keys, shapes, leading batch dim of cu_seqlens and metadata left global (partition substituted)."""
    seen = []

    def fake_partition(cu, cp, rank):
        seen.append((cu.tolist(), cp, rank))
        return torch.tensor(layout(cu.tolist(), cp, rank))

    monkeypatch.setattr(thd_batch, "_partition_index", fake_partition)
    monkeypatch.setattr(thd_batch, "_group_size_rank", lambda group: (2, 1))
    batch = thd_batch.get_thd_batch_on_this_cp_rank(_packed_batch(32), CU_PAD.view(1, -1), object())
    want = layout(CU_PAD.tolist(), 2, 1)
    assert seen == [(CU_PAD.tolist(), 2, 1)]
    assert batch["tokens"].tolist() == [want] and batch["labels"].tolist() == [[w + 1000 for w in want]]
    assert batch["position_ids"].tolist() == [[w * 7 for w in want]] and batch["loss_mask"].shape == (1, 16)
    assert batch["cu_seqlens_padded"].tolist() == [CU_PAD.tolist()] and batch["attention_mask"] is None
    with pytest.raises(ValueError, match="cover the sequence exactly"):
        thd_batch.get_thd_batch_on_this_cp_rank(_packed_batch(36), CU_PAD, object())
    # Megatron's per-document entry point: cu_seqlens_padded when given, else cu_seqlens
    seen.clear()
    b = _packed_batch(32)
    b["cu_seqlens"], b["cu_seqlens_padded"] = CU_PAD.view(1, -1), None
    thd_batch.per_document_cp_split(b, object())
    assert seen == [(CU_PAD.tolist(), 2, 1)]


def test_thd_batch_cp1_unchanged():
    b = _packed_batch(32)
    assert thd_batch.get_thd_batch_on_this_cp_rank(b, CU_PAD, None)["tokens"].shape == (1, 32)


@pytest.mark.parametrize("cp", [2, 4])
def test_thd_batch_split_matches_te_layout(cp):
    """needs_thd_partition: megatron_tasp.thd.partition_index against TE's layout written out."""
    cu_pad = [0, 2 * cp, 6 * cp, 8 * cp]

    def worker(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            b = {"tokens": torch.arange(8 * world).view(1, -1), "labels": None}
            group = parallel_state.get_context_parallel_group()
            return thd_batch.get_thd_batch_on_this_cp_rank(b, torch.tensor(cu_pad), group)["tokens"][0].tolist()
        finally:
            parallel_state.destroy_model_parallel()

    got = run_workers(worker, cp)
    for rank in range(cp):
        assert got[rank] == layout(cu_pad, cp, rank)
    assert sorted(sum(got, [])) == list(range(8 * cp))


def test_installed_split_serves_megatron_get_batch_on_this_cp_rank():
    """needs_thd_partition: Megatron-Core's own get_batch_on_this_cp_rank (no TE here) after installing.
    Megatron-Core releases without the per-document split hook (0.16) refuse to install, naming the fix."""
    import megatron.core.utils as mutils0

    if not hasattr(mutils0, "_get_batch_on_this_cp_rank_per_document_balancing"):
        with pytest.raises(RuntimeError, match="use megatron-core 0.19"):
            thd_batch.install_thd_batch_partition()
        return

    def worker(rank, world):
        import megatron.core.utils as mutils
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            group = parallel_state.get_context_parallel_group()
            assert thd_batch.install_thd_batch_partition() is True
            assert thd_batch.install_thd_batch_partition() is False  # idempotent
            out = mutils.get_batch_on_this_cp_rank(_packed_batch(32), False, cp_group=group)
            thd_batch.uninstall_thd_batch_partition()
            assert not hasattr(mutils._get_batch_on_this_cp_rank_per_document_balancing, "original")
            return {k: out[k].tolist() for k in ("tokens", "labels", "position_ids", "cu_seqlens_padded")}
        finally:
            parallel_state.destroy_model_parallel()

    for rank, got in enumerate(run_workers(worker, 2)):
        want = layout(CU_PAD.tolist(), 2, rank)
        assert got["tokens"] == [want] and got["labels"] == [[w + 1000 for w in want]]
        assert got["position_ids"] == [[w * 7 for w in want]] and got["cu_seqlens_padded"] == [CU_PAD.tolist()]


def test_installed_split_serves_flattened_micro_batches():
    """needs_thd_partition: micro-batch 2 as Megatron-LM's get_batch runs it: megatron-core flattens the two
    packs (SFT-style cu_seqlens padded to a fixed length with the pack length) into one THD batch, then the
    installed split cuts every document of the merged boundaries over the CP ranks."""
    import megatron.core.utils as mutils0

    if not hasattr(mutils0, "flatten_batch_for_packed_sequences"):
        pytest.skip("this megatron-core has no flatten_batch_for_packed_sequences (micro-batch > 1 THD)")
    seq = 32
    first = [0, 8, 20, 24, 32]       # documents 8, 12, 4, 8 (multiples of 2·CP = 4)
    second = [0, 12, 16, 32]         # documents 12, 4, 16

    def sft_cu(cu: list[int]) -> list[int]:
        return cu + [seq] * (seq + 1 - len(cu))  # SFTDataset pads cu_seqlens to a fixed length with seq

    def worker(rank, world):
        import megatron.core.utils as mutils
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            group = parallel_state.get_context_parallel_group()
            thd_batch.install_thd_batch_partition()
            t = torch.arange(2 * seq).view(2, seq)
            cu = torch.tensor([sft_cu(first), sft_cu(second)], dtype=torch.int32)
            batch = {"tokens": t.clone(), "labels": t + 1000, "loss_mask": torch.ones(2, seq),
                     "position_ids": t * 7, "attention_mask": None, "cu_seqlens": cu,
                     "max_seqlen": torch.tensor([12, 16], dtype=torch.int32)}
            batch = mutils.flatten_batch_for_packed_sequences(batch)
            out = mutils.get_batch_on_this_cp_rank(batch, False, cp_group=group)
            thd_batch.uninstall_thd_batch_partition()
            return {k: out[k].tolist() for k in ("tokens", "labels", "position_ids", "cu_seqlens")}
        finally:
            parallel_state.destroy_model_parallel()

    merged = first + [seq + c for c in second[1:]]
    for rank, got in enumerate(run_workers(worker, 2)):
        want = layout(merged, 2, rank)
        assert got["cu_seqlens"] == [merged]
        assert got["tokens"] == [want] and got["labels"] == [[w + 1000 for w in want]]
        assert got["position_ids"] == [[w * 7 for w in want]]


def test_undivisible_documents_fail_closed():
    """needs_thd_partition: a padded document that is not a multiple of 2*CP is refused."""

    def worker(rank, world):
        from megatron.core import parallel_state

        parallel_state.initialize_model_parallel(context_parallel_size=world)
        try:
            b = {"tokens": torch.arange(12).view(1, -1)}
            thd_batch.get_thd_batch_on_this_cp_rank(b, torch.tensor([0, 6, 12]), parallel_state.
                                                    get_context_parallel_group())
        finally:
            parallel_state.destroy_model_parallel()

    with pytest.raises(WorkerError, match="multiple of 2"):
        run_workers(worker, 2)


# ----------------------------------------------------------------------------------- launcher and Megatron-LM patch


PATCH = Path(__file__).resolve().parents[1] / "patches" / "megatron-lm-core_v0.19.0-context-parallel-backend.patch"


def test_patched_megatron_lm_accepts_sft_and_installs_the_split_and_rope(tmp_path):
    if not H.has_megatron_training():
        pytest.skip("this megatron-core wheel has no megatron/training")
    import megatron.core

    training = Path(megatron.core.__file__).resolve().parents[1] / "training"
    shutil.copytree(training, tmp_path / "megatron" / "training", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = ["patch", "-s", "-p1", "-i", str(PATCH)] if shutil.which("patch") else ["git", "apply", str(PATCH)]
    subprocess.run(cmd, cwd=tmp_path, check=True)
    out = H.run_probe(f"patched_thd_probe({str(tmp_path)!r})", timeout=300)
    assert out["sft"] == ["accepted", ["tasp"], True, "document"]
    assert out["sft_idm"] == ["accepted", ["tasp"], True, "document"]
    assert out["idm"] == ["accepted", ["tasp"], True, "sequence"]  # the sequence split as a whole
    assert "learned_absolute" in out["idm_rope"][0]  # Megatron-Core's packed RoPE needs the per-document split
    assert out["kinds"] == ["TaspDotProductAttention", "TaspDotProductAttention"]
    assert out["split"] == ["megatron.core.utils", "megatron_tasp.megatron.thd_batch"]
    assert out["rope"] == ["megatron.core.models.common.embeddings.rope_utils", "megatron_tasp.megatron.thd_rope"]


def test_launcher_installs_the_split_and_rope(tmp_path):
    if not H.has_megatron_training():
        pytest.skip("this megatron-core wheel has no megatron/training")
    (tmp_path / "pretrain_gpt.py").write_text(H.FAKE_PRETRAIN_GPT)
    out = H.run_probe(f"launcher_thd_probe({str(tmp_path)!r}, ['--context-parallel-backend', 'tasp', "
                      "'--attention-dropout', '0.0', '--sft'])", timeout=300)
    assert out["tasp_enabled"] is True and out["kinds"] == ["TaspDotProductAttention"] * 2
    assert out["split"] == "megatron_tasp.megatron.thd_batch"
    assert out["rope"] == "megatron_tasp.megatron.thd_rope"
    out = H.run_probe(f"launcher_thd_probe({str(tmp_path)!r}, ['--attention-dropout', '0.0'])", timeout=300)
    assert out["tasp_enabled"] is False and out["split"] == "megatron.core.utils"  # only with TASP selected
    assert out["rope"] == "megatron.core.models.common.embeddings.rope_utils"
