"""`launch experiment`: base vs SFT vs DPO vs sequential vs PAFT (merge methods x dense/L1 SFT), evaluated."""
