"""S2FT: selection config, partial back-propagation layer, and ``prepare_s2ft``."""
