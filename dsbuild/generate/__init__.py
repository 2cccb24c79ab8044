"""Prompt-to-Prompt image pairs on Stable Diffusion (the generate stage)."""
