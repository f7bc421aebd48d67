"""SimCLR pretraining: augmentations, encoders, NT-Xent, LARS, the training loop and evaluation."""
