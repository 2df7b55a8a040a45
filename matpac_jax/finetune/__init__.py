"""AudioSet (and any labelled records) fine-tuning: head, objective, augmentation, sampler, evaluation."""
