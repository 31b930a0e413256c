"""Synthetic VQA testbed: seeded scenes, questions and evaluation sets for visual-token pruning."""
