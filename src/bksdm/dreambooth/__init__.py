"""DreamBooth personalisation (appendix Table 4): fine-tuning with prior preservation, the benchmark, metrics."""
