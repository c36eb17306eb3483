"""The TASP engine: how :func:`megatron_tasp.attention.tasp_attention` runs, one concern per module.

============  ===============================================================================================
``plan``      rank plan: topology, rings over CP ranks (host placement), schedule steps; piece layout
``compiled``  a call compiled for its shapes and options (effective options, kernel, transports)
``agree``     the first call's cross-rank agreement (one all-reduce; every rank raises on a mismatch)
``forward``   the forward loop (local block, then one step per ring hop, log-sum-exp merges)
``backward``  the backward loop (re-exchanged or kept KV; dK/dV travelling one hop behind)
``exchange``  transports (a2a, p2p, symm, none) and their pools (streams, symmetric memory)
``channel``   flat double-buffered piece buffers split into lanes; the side stream of the first exchange
``cache``     the one plan cache (bounded, keyed by the group's global ranks; ``clear_plan_cache()``)
``thd``       packed documents: the call re-targeted at document boundaries (segmented block kernels)
``errors``    ``TaspConfigError``
============  ===============================================================================================

Packed documents (``thd``; the partition is :mod:`megatron_tasp.thd`) reuse a compiled call with its block
kernels swapped for segmented ones (``CompiledCall.local_kernel`` and ``CompiledCall.blocks``); the loops
here are unchanged.
"""
