"""MATPAC / MATPAC++ pretraining (SPEC §3-4): model, objective, state, step and the trainer task."""
