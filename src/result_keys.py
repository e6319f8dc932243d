"""The metric keys of a result file that tables are made of, stated once for the code that
computes them (src.metrics) and the code that tables them (src.aggregate)."""

# the paper's utility and privacy columns
PAPER_KEYS = ("auc", "average_mindistance", "dcr_p5", "dcr_p50", "mia_auc")
# privacy and fidelity metrics users of synthcity, SDMetrics and prdc know (src.metrics.privacy_metrics)
EXTRA_PRIVACY_KEYS = ("exact_copy_share", "identifiability", "dcr_holdout_share", "sdmetrics_dcr_closer_to_training",
                      "mia_auc_density")
FIDELITY_KEYS = ("precision", "recall", "density", "coverage")
