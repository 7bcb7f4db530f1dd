"""Data layer (plain arguments, never a config): `metadata` (the CSVs, leakage check), `sources` (where a
run's CSVs and TFRecords live), `folds` (patient-grouped folds), `records` (TFRecord layouts), `pipeline`
(the tf.data pipeline), `augment`, `sharding` (each process's share), `synthetic` (lesions drawn on the real
metadata)."""
