"""The model core: mesh and sharding rules, the decoder, the fused LM head, checkpoints, the
optimizer, the KV-cache sampler, monitoring. Imports only config/errors (and data's tokenizer ids)."""
