"""Benchmarks of the serving engine against PEFT and Hugging Face `generate` baselines."""
