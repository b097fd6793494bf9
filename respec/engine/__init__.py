"""The rollout core: decoder, KV cache, checkpoint I/O, sampling and the exact rejection rule, the EAGLE-3
drafter, the generate loop and the tuner that picks each step's draft length. Knows nothing of text, tasks or
training."""
