"""Helpers for testing megatron-tasp: forked multi-process gloo workers and references."""
