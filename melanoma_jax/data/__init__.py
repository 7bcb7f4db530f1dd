"""Data layer: metadata, leakage check, folds, TFRecords, synthetic lesions, tf.data pipeline."""
