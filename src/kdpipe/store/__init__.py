"""Teacher store: a teacher's top-k next-token distributions, written once and read by many distillation runs."""
