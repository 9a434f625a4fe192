"""PISA: config, block-FFT delta layer, and ``prepare_pisa``."""
