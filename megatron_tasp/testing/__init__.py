"""Deprecated location of the fork launcher; import :mod:`megatron_tasp.launch` instead."""
