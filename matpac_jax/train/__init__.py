"""The method-agnostic trainer: the Task protocol, the loop, the jitted step's sharding and non-finite guard,
optimizers, metrics, input prefetch, preemption."""
