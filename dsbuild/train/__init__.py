"""Companion trainer: fine-tune InstructPix2Pix on an export (``dsbuild train``); see docs/train.md."""
