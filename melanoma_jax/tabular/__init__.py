"""Tabular model on the ISIC metadata: features (+ patient context), SMOTE, a Flax MLP, grouped CV."""
