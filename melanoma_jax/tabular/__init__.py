"""Tabular model on the ISIC metadata: `features` (encoding + patient context), `balance` (SMOTE), `task`
(patient-grouped CV of the Flax MLP through the shared fit loop; main.py's tabular task)."""
