"""The rollout core: decoder, KV cache and slot table, checkpoint I/O, sampling and the exact rejection rule, the
EAGLE-3 drafter, the engine (continuous batching over slots, `generate`) and the tuner that picks each step's draft
length. Knows nothing of text, tasks or training."""
