"""Evaluation parts that the eval_*.py scripts and main.py's monitor are built from:
loading pretrained weights, feature extraction, k-NN, the linear head, clustering
metrics, accuracy counts."""
