"""One trainer for pretraining (and, later, distillation): state, optimizer, schedules, the step and the loop."""
