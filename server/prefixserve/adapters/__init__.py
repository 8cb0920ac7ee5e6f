"""Prompt-learning adapters: their PEFT formats (format, archive, kv_prefix), ids, the durable store (store:
the contract; stores: pick a backend; store_dir, store_s3) and the device registry. Knows nothing of the
engine or of HTTP."""
