"""vllm-snapkv: SnapKV KV-cache compression for stock vLLM (v1 engine, paged KV cache)."""

__version__ = "0.1.0"
