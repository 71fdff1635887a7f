"""Datasets, chat prompts and teacher contexts, and realigned student/teacher sequences (torch-free on import)."""
