"""Training support for ramcli: caption parsing into tags, training data loading, synthetic data."""
