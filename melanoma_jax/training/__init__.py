"""Training core shared by the image and tabular models: loss, AUC, state, pmapped steps, checkpoints."""
