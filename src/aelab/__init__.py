"""aelab: which autoencoder pretraining gives the best image classifier for the compute you have."""

__version__ = "0.1.0"
