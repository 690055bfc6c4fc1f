"""Data: the dataset registry (datasets.py), image reading, the views of pretraining
and evaluation (transforms.py, and gpu_views.py / encoded.py for --data_backend gpu),
per-sample seeded loading (loader.py), the demo data and the ImageNet subsets."""
