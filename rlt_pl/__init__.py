"""rlt_pl: Reinforcement-Learned Teachers (Cetin, Zhao, Tang, arXiv 2506.08388) in PyTorch Lightning."""

__version__ = "0.1.0"
