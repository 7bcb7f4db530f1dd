"""Tabular MLP on the ISIC 2020 metadata: patient-grouped 5-fold CV, SMOTE, optional patient context.

  python main.py --config=configs/tabular.py --workdir=runs/tabular
  python main.py --config=configs/tabular.py --workdir=runs/tabular_seed --config.patient_context=False
"""
import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.task = "tabular"
  config.data_dir = ""  # "" = the embedded real train.csv/test.csv; else DIR/train.csv and DIR/test.csv.
  config.seed = 0
  config.num_folds = 5
  config.num_epochs = 400  # A ceiling: early stopping on validation AUC ends each fold long before.
  config.early_stopping_patience = 5
  # Epochs before the first candidate for "best": a model picked at epoch 1-2 is barely trained, its logits
  # squeezed near 0, and mixing such a fold with the others lowers the pooled out-of-fold AUC.
  config.early_stopping_start_epoch = 5
  config.per_device_batch_size = 2048
  config.global_batch_size = 0  # 0 = per_device_batch_size x local devices; else must divide evenly.
  config.learning_rate = 5e-5  # optax.adam.
  config.hidden_sizes = (512, 256, 128, 32)
  config.dropout_rate = 0.1
  config.patient_context = True  # Per-patient "ugly duckling" features from the same table (no targets).
  config.smote = True  # SMOTE the training folds to 1:1; validation and test rows are never synthesised.
  # 10, not imblearn's 5: with mostly one-hot features, 5 nearest malignant neighbours are often copies of the
  # row, so SMOTE mostly duplicates (docs/tabular.md).
  config.smote_k_neighbors = 10
  # Platt-scale each fold model on its own original training rows, so outputs are probabilities at the real
  # malignant rate (SMOTE and class weights move them) and fold models are comparable when pooled/averaged.
  config.calibrate = True
  config.label_smoothing = 0.0
  config.class_weights = config_dict.placeholder(tuple)  # None = N / (2 N_c) of the rows trained on.
  return config
