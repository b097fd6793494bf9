"""RL fine-tuning on the speculative engine: GRPO math (`grpo`), the trainer loop (`trainer`) over its roles
(`problems`, `rollout`, `update`, `evaluator`), its config, its run directory (`checkpoint`) and the online
drafter learner (`learner`)."""
