"""Using trained models: loading (export or checkpoint), generation with a KV cache, prompt-selected experts."""
