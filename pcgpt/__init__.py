"""pcgpt: an inference server for nanoGPT-family and predictive-coding GPT models.

pcgpt.model computes (models, sampling, checkpoints, training) and imports nothing from
pcgpt.serve, the HTTP server and its engines.
"""
