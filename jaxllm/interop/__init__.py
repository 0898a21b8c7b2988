"""Interoperability with other ecosystems: Hugging Face checkpoints (`jaxllm.interop.hf`)."""

from jaxllm.interop.hf import HFError, load_pretrained, save_pretrained

__all__ = ["HFError", "load_pretrained", "save_pretrained"]
