"""Protocols that follow allenai/open-instruct's evaluation scripts (the paper's Table 2 GSM8K)."""
