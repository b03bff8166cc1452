"""LVLM caption augmentation: keyframe grids and LLaVA captions (MAMA section 3)."""
