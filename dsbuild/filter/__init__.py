"""The filter stage: CLIP/DINO scores, InstructPix2Pix thresholds, top-k per triple."""
