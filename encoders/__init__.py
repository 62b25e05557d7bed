"""Domain encoders: one file per modality, each holding its featurizer and its module."""
