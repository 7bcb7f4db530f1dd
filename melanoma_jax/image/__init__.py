"""The image task: InceptionResNetV2 (or the tiny CNN) on TFRecords of one patient-grouped fold."""
