"""RL fine-tuning on the speculative engine: GRPO math (`grpo`), the trainer loop (`trainer`), its config."""
