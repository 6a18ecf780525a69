"""Benchmark manifests of the seed papers (``vidshift manifest NAME``) and readers of the formats their datasets
and feature releases ship in. Class maps and the papers' counts are data files beside the code
(``classes/*.csv``, ``expected_counts.csv``); see docs/datasets.md."""
