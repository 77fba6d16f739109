"""What training and evaluation both read: a partition materialised as tensors (preprocessed
attention-module inputs and frozen-backbone features), and the checksummed on-disk cache that
keeps them. It sits above ``data`` and ``models`` and below ``training`` and ``evaluation``."""
