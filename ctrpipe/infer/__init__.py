"""Stage 6: fold ensembling, calibration, submissions and blending."""
