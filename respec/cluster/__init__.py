"""Ray placement of the RL roles (`trainer.backend=ray`): rollout workers each owning a slot engine, the drafter
learner as an actor of its own, weights through a small transport interface, one placement group per run.

`cluster.ray_cluster` connects and places, `cluster.workers` shards rollouts over the workers and survives a dead
one, `cluster.learner_actor` runs the online learner in an actor and forwards its published drafters. Nothing
here is imported unless a run asks for the Ray backend, and Ray is needed only then (the `ray` extra).
"""
