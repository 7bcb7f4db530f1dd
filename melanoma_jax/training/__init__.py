"""Training core shared by the image and tabular models.

Public modules (each says what it exports): `steps` (pure pmapped train/predict steps), `state` (the train
state), `losses`, `loop` (the epoch loop: `fit`, `Plan`, `finished_meta`), `checkpoint` (`Checkpointer`),
`predict` (`collect`, `array_batches`: every real row out once), `reporting` (progress lines, TensorBoard),
`identity` (a workdir's run record and `recorded_config`), `results` (`write_results`), `distributed` (the
multi-process runtime), `workdir` (the workdir lock). Metrics and reports live in `melanoma_jax.evaluation`.
"""
